"""Fine-tuning data layer: JSONL splits, format detection, SFT/preference encoding and batching."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from phi3mlx.errors import Phi3MLXError
from phi3mlx.finetune import data as D
from phi3mlx.tokenizer import load_tokenizer

from .helpers import phi3_small_tokenizer_config

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! How are you?"},
    {"role": "user", "content": "Fine, and you?"},
    {"role": "assistant", "content": "Good, thanks."},
]
ROWS = {
    "text": {"text": "The quick brown fox jumps over the lazy dog."},
    "completion": {"prompt": "What is 2+2?", "completion": "It is 4."},
    "chat": {"messages": CHAT},
    "preference": {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "A dog."},
    "openai_preference": {
        "input": {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]},
        "preferred_output": [{"role": "assistant", "content": "Blue."}],
        "non_preferred_output": [{"role": "assistant", "content": "A dog."}],
    },
}


@pytest.fixture(scope="module")
def tok(tiny_folder):
    """The tiny model's tokenizer (the real Phi-3 one)."""
    return load_tokenizer(tiny_folder)


def write_jsonl(f: Path, rows, blank_after: int = -1) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    if blank_after >= 0:
        lines.insert(blank_after, "   ")
    f.write_text("\n".join(lines) + "\n")
    return f


def masked_spans(tok, ids, mask) -> list[str]:
    """Each run of masked-in tokens decoded on its own (leading spaces dropped: tokenizers differ there)."""
    runs, run = [], []
    for i, m in zip(ids + [0], mask + [0]):
        if m:
            run.append(i)
        elif run:
            runs.append(tok.decode(run).lstrip(" "))
            run = []
    return runs


# --- load_split -------------------------------------------------------------------------------------


def test_load_split_folder_and_single_file(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [ROWS["text"]] * 3, blank_after=1)
    write_jsonl(tmp_path / "valid.jsonl", [ROWS["text"]])
    rows = D.load_split(tmp_path, "train")
    assert rows == [ROWS["text"]] * 3  # the blank line is skipped
    assert [r.line for r in rows] == [1, 3, 4] and rows[0].file == str(tmp_path / "train.jsonl")
    assert len(D.load_split(tmp_path, "valid")) == 1
    assert D.load_split(tmp_path, "test", required=False) == []

    single = write_jsonl(tmp_path / "all.jsonl", [ROWS["chat"]] * 2)
    assert D.load_split(single, "train") == [ROWS["chat"]] * 2
    assert D.load_split(str(single), "valid", required=False) == []


@pytest.mark.parametrize("case", ["missing_path", "missing_split", "single_file_split", "empty", "blank_only",
                                 "bad_json", "not_object", "not_utf8", "not_jsonl"])
def test_load_split_errors(tmp_path, case):
    f = tmp_path / "train.jsonl"
    path, split, expect = tmp_path, "train", []
    if case == "missing_path":
        path, expect = tmp_path / "nowhere", ["nowhere", "does not exist"]
    elif case == "missing_split":
        write_jsonl(f, [ROWS["text"]])
        split, expect = "valid", ["valid.jsonl", str(tmp_path)]
    elif case == "single_file_split":
        path, split, expect = write_jsonl(f, [ROWS["text"]]), "test", ["train.jsonl", "test split"]
    elif case == "empty":
        f.write_text("")
        expect = [f"{f}: no examples"]
    elif case == "blank_only":
        f.write_text("\n  \n\n")
        expect = [f"{f}: no examples"]
    elif case == "bad_json":
        write_jsonl(f, [ROWS["text"], '{"text": "unterminated', ROWS["text"], "{'text': 1}"])
        expect = [f"{f}:2: not valid JSON (", f"{f}:4: not valid JSON ("]
    elif case == "not_object":
        write_jsonl(f, [ROWS["text"], ROWS["text"], '["a", "b"]'])
        expect = [f"{f}:3: expected a JSON object, got an array"]
    elif case == "not_utf8":
        f.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
        expect = [f"{f}:2: not valid UTF-8"]
    elif case == "not_jsonl":
        path, expect = write_jsonl(tmp_path / "data.json", [ROWS["text"]]), ["data.json", ".jsonl"]
    with pytest.raises(Phi3MLXError) as e:
        D.load_split(path, split)
    msg = str(e.value)
    assert "\n" not in msg
    for piece in expect:
        assert piece in msg


def test_many_bad_lines_are_listed_then_counted(tmp_path):
    f = write_jsonl(tmp_path / "train.jsonl", ["{oops"] * 8)
    with pytest.raises(Phi3MLXError, match=r"train.jsonl:5: not valid JSON.*and 3 more bad lines$") as e:
        D.load_split(f, "train")
    assert f"{f}:6:" not in str(e.value)


# --- detect_format ----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", D.FORMATS)
def test_detect_format(tmp_path, fmt):
    rows = D.load_split(write_jsonl(tmp_path / "train.jsonl", [ROWS[fmt]] * 2), "train")
    assert D.detect_format(rows, tmp_path / "train.jsonl") == fmt


def test_detect_format_reports_every_bad_row(tmp_path):
    f = tmp_path / "train.jsonl"
    rows = [ROWS["completion"], {"prompt": "no answer"}, ROWS["completion"], ROWS["chat"],
            {"completion": "no question"}, ROWS["completion"]]
    with pytest.raises(Phi3MLXError) as e:
        D.detect_format(D.load_split(write_jsonl(f, rows, blank_after=2), "train"), f)
    msg = str(e.value)
    assert msg.startswith(f"{f}: 3 of 6 rows do not fit the completion format (prompt, completion): ")
    # lines count the blank line (the 3rd physical line)
    assert "line 2: missing 'completion'" in msg
    assert "line 5: a chat row, missing 'prompt', 'completion'" in msg
    assert "line 6: missing 'prompt'" in msg


def test_detect_format_lists_a_few_then_counts(tmp_path):
    rows = [ROWS["text"]] * 3 + [{"txt": "typo"}] * 9
    with pytest.raises(Phi3MLXError) as e:
        D.detect_format(rows, "data.jsonl")  # plain dicts: rows are numbered from 1
    msg = str(e.value)
    assert "9 of 12 rows do not fit the text format" in msg
    assert "line 4: missing 'text'" in msg and "line 8: missing 'text'" in msg and "line 9:" not in msg
    assert msg.endswith("and 4 more rows")


@pytest.mark.parametrize("row, problem", [
    ({"text": 3}, "line 1: 'text' is not a string"),
    ({"prompt": "q", "completion": ["a"]}, "line 1: 'completion' is not a string"),
    ({"messages": []}, "line 1: 'messages' is not a non-empty list of messages"),
    ({"messages": [{"role": "user"}]}, "line 1: 'messages[0]' is not a message"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "line 1: no assistant message in 'messages'"),
    ({"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"},
     "line 1: 'chosen[0]' has role 'user'"),
    ({"input": [], "preferred_output": [], "non_preferred_output": []}, "line 1: 'input' is not an object"),
    ({"input": {"messages": CHAT[:2]}, "preferred_output": [{"role": "assistant", "content": "a"}],
      "non_preferred_output": "b"}, "line 1: 'non_preferred_output' is not a non-empty list"),
])
def test_detect_format_checks_values(row, problem):
    with pytest.raises(Phi3MLXError) as e:
        D.detect_format([row], "f.jsonl")
    assert str(e.value).startswith("f.jsonl: 1 of 1 rows") and problem in str(e.value)


def test_detect_format_unknown_and_empty():
    with pytest.raises(Phi3MLXError, match=r"^d.jsonl: unknown data format \(first row's keys: 'instruction', 'output'\)"):
        D.detect_format([{"instruction": "a", "output": "b"}], "d.jsonl")
    with pytest.raises(Phi3MLXError, match="d.jsonl: no examples"):
        D.detect_format([], "d.jsonl")


# --- encode_sft -------------------------------------------------------------------------------------


def test_encode_text(tok):
    text = ROWS["text"]["text"]
    ids, mask = D.encode_sft(ROWS["text"], "text", tok, mask_prompt=True)
    assert ids == tok.encode(text) + [tok.eos_token_id] and mask == [1] * len(ids)
    ids2, _ = D.encode_sft({"text": text + "<|endoftext|>"}, "text", tok, mask_prompt=False)
    assert ids2 == ids  # eos already there: not doubled


def test_encode_chat_masks_assistant_turns_only(tok):
    for mask_prompt in (False, True):
        ids, mask = D.encode_sft(ROWS["chat"], "chat", tok, mask_prompt)
        assert ids == tok.apply_chat_template(CHAT, add_generation_prompt=False, tokenize=True)
        assert len(mask) == len(ids)
        assert masked_spans(tok, ids, mask) == ["Hello! How are you?<|end|>", "Good, thanks.<|end|>"]
        # the token before each turn (the assistant header) is not a target; the closing eos neither
        assert tok.decode([ids[mask.index(1) - 1]]) == "<|assistant|>" and mask[-1] == 0


def test_encode_completion(tok):
    row = ROWS["completion"]
    rendered = tok.apply_chat_template([{"role": "user", "content": row["prompt"]},
                                        {"role": "assistant", "content": row["completion"]}],
                                       add_generation_prompt=False, tokenize=True)
    ids, mask = D.encode_sft(row, "completion", tok, mask_prompt=False)
    assert ids == rendered and mask == [1] * len(ids)
    ids, mask = D.encode_sft(row, "completion", tok, mask_prompt=True)
    assert ids == rendered and masked_spans(tok, ids, mask) == ["It is 4.<|end|>"]
    assert sum(mask) < len(ids) - 5


def test_encode_sft_rejects_preference_data(tok):
    with pytest.raises(Phi3MLXError, match="preference training"):
        D.encode_sft(ROWS["preference"], "preference", tok, False)


class StubTokenizer:
    """A tokenizer whose chat template is given as a function of (messages, add_generation_prompt)."""

    eos_token_id = 2

    def __init__(self, render):
        self.render = render

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=False, **kw):
        return self.render(messages, add_generation_prompt)


def test_prefix_unstable_template_is_an_error(tmp_path):
    def counted(messages, gen):  # starts with the message count: no rendering is a prefix of a longer one
        return [len(messages)] + [10 + len(m["content"]) for m in messages] + ([1] if gen else [2])

    f = write_jsonl(tmp_path / "train.jsonl", [ROWS["chat"], ROWS["preference"]])
    rows = D.load_split(f, "train")
    with pytest.raises(Phi3MLXError, match=rf"^{f}:1: the chat template does not tokenize prefix-stably"):
        D.encode_sft(rows[0], "chat", StubTokenizer(counted), False)
    with pytest.raises(Phi3MLXError, match=rf"^{f}:2: the chat template does not tokenize prefix-stably"):
        D.encode_preference(rows[1], "preference", StubTokenizer(counted))


def test_template_failure_names_the_line(tmp_path):
    def broken(messages, gen):
        raise ValueError("roles must alternate\nsecond line")

    rows = D.load_split(write_jsonl(tmp_path / "train.jsonl", [ROWS["completion"]] * 3), "train")
    with pytest.raises(Phi3MLXError, match=r"train.jsonl:3: the chat template failed \(ValueError: roles must alternate\)$"):
        D.encode_sft(rows[2], "completion", StubTokenizer(broken), False)


def test_chat_mask_with_phi3_small_template(tmp_path, cl100k_bpe):
    shutil.copy(cl100k_bpe, tmp_path / "cl100k_base.tiktoken")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(phi3_small_tokenizer_config()))
    small = load_tokenizer(tmp_path, {"model_type": "phi3small"})
    ids, mask = D.encode_sft(ROWS["chat"], "chat", small, False)
    assert ids == small.apply_chat_template(CHAT, add_generation_prompt=False, tokenize=True)
    # this template writes "\n" after each <|end|>: it belongs to the turn
    assert masked_spans(small, ids, mask) == ["Hello! How are you?<|end|>\n", "Good, thanks.<|end|>\n"]
    p, c, r = D.encode_preference(ROWS["preference"], "preference", small)
    assert small.decode(c) == "Blue.<|end|>\n<|endoftext|>"


# --- encode_preference ------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", D.PREFERENCE_FORMATS)
def test_encode_preference(tok, fmt):
    row = ROWS[fmt]
    prompt_ids, chosen, rejected = D.encode_preference(row, fmt, tok)
    if fmt == "preference":
        prompt = [{"role": "user", "content": row["prompt"]}]
        good, bad = [{"role": "assistant", "content": row["chosen"]}], [{"role": "assistant", "content": row["rejected"]}]
    else:
        prompt, good, bad = row["input"]["messages"], row["preferred_output"], row["non_preferred_output"]
    assert prompt_ids == tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
    assert prompt_ids + chosen == tok.apply_chat_template(prompt + good, add_generation_prompt=False, tokenize=True)
    assert prompt_ids + rejected == tok.apply_chat_template(prompt + bad, add_generation_prompt=False, tokenize=True)
    assert tok.decode(chosen).lstrip(" ").startswith("Blue.<|end|>")
    assert tok.decode(rejected).lstrip(" ").startswith("A dog.<|end|>")


def test_encode_preference_with_message_lists(tok):
    row = {"prompt": CHAT[:4], "chosen": [{"role": "assistant", "content": "Good."}],
           "rejected": [{"role": "assistant", "content": "Go away."}]}
    assert D.detect_format([row], "p.jsonl") == "preference"
    prompt_ids, chosen, _ = D.encode_preference(row, "preference", tok)
    assert tok.decode(prompt_ids[:1]) == "<|system|>" and tok.decode(prompt_ids[-1:]) == "<|assistant|>"
    assert prompt_ids + chosen == tok.apply_chat_template(CHAT[:4] + row["chosen"], add_generation_prompt=False,
                                                          tokenize=True)


def test_encode_preference_rejects_sft_data(tok):
    with pytest.raises(Phi3MLXError, match="chosen/rejected"):
        D.encode_preference(ROWS["chat"], "chat", tok)


@pytest.mark.parametrize("fmt", D.FORMATS)
def test_each_format_end_to_end(tmp_path, tok, fmt):
    write_jsonl(tmp_path / "train.jsonl", [ROWS[fmt]] * 4)
    rows = D.load_split(tmp_path, "train")
    assert D.detect_format(rows, tmp_path / "train.jsonl") == fmt
    if fmt in D.SFT_FORMATS:
        examples = [D.encode_sft(r, fmt, tok, mask_prompt=True) for r in rows]
        inputs, targets, mask = next(D.iterate_batches(examples, 2, 64))
        assert inputs.shape == targets.shape == mask.shape and inputs.shape[0] == 2
        assert mask.sum().item() == sum(sum(m[1:]) for _, m in examples[:2])
    else:
        examples = [D.encode_preference(r, fmt, tok) for r in rows]
        batch = next(D.iterate_preference_batches(examples, 2, 64))
        assert batch["chosen"][0].shape == batch["rejected"][0].shape
        assert batch["chosen"][2].sum().item() == 2 * len(examples[0][1])


# --- batching ---------------------------------------------------------------------------------------


def make_examples(lengths, start: int = 1000):
    """Example k: ids [start + k, 1, 2, ...] (n tokens), mask all 1 (its first id names it)."""
    return [([start + k] + list(range(1, n)), [1] * n) for k, n in enumerate(lengths)]


def collect(batches):
    return [tuple(np.array(a) for a in b) for b in batches]


def test_batches_shapes_shift_and_padding():
    examples = make_examples([5, 3, 4])
    (inputs, targets, mask), = collect(D.iterate_batches(examples, 3, 16, shuffle=False))
    assert inputs.dtype == np.int32 and targets.dtype == np.int32 and mask.dtype == np.float32
    assert inputs.shape == (3, 4)  # longest is 5 tokens -> 4 positions
    assert inputs[0].tolist() == [1001, 1, 0, 0] and targets[0].tolist() == [1, 2, 0, 0]
    assert mask[0].tolist() == [1, 1, 0, 0]  # sorted by length: the 3-token example first
    assert inputs[2].tolist() == [1000, 1, 2, 3] and targets[2].tolist() == [1, 2, 3, 4] and mask[2].sum() == 4


def test_batches_follow_the_loss_mask():
    ids, mask = [7, 8, 9, 10, 11], [0, 0, 1, 1, 0]
    inputs, targets, loss_mask = collect(D.iterate_batches([(ids, mask)], 1, 16))[0]
    assert loss_mask[0].tolist() == [0, 1, 1, 0] and targets[0][loss_mask[0] == 1].tolist() == [9, 10]


def test_length_sorting_reduces_padding():
    rng = np.random.default_rng(1)
    lengths = rng.integers(2, 200, size=96).tolist()
    examples = make_examples(lengths)
    batches = collect(D.iterate_batches(examples, 8, 256, seed=3))
    sorted_pad = 1 - sum(m.sum() for _, _, m in batches) / sum(m.size for _, _, m in batches)
    real = np.array(lengths) - 1
    random_groups = rng.permutation(len(lengths)).reshape(-1, 8)
    random_pad = 1 - real.sum() / sum(8 * real[g].max() for g in random_groups)
    assert sorted_pad < random_pad / 3, (sorted_pad, random_pad)
    for inputs, _, mask in batches:  # each batch spans a narrow length range
        n = mask.sum(axis=1)
        assert n.max() - n.min() <= 30 and inputs.shape[1] == n.max()


def test_batches_deterministic_and_cover_each_example_once():
    examples = make_examples([3, 9, 4, 7, 2, 8, 5, 6, 3, 10, 4])  # 11 examples: the last batch has 3
    first = collect(D.iterate_batches(examples, 4, 32, seed=7))
    again = collect(D.iterate_batches(examples, 4, 32, seed=7))
    assert len(first) == 3 and all((a == b).all() for x, y in zip(first, again) for a, b in zip(x, y))
    seen = sorted(int(i) for inputs, _, _ in first for i in inputs[:, 0])
    assert seen == list(range(1000, 1011))
    orders = {tuple(int(b[0][0, 0]) for b in collect(D.iterate_batches(examples, 4, 32, seed=s))) for s in range(8)}
    assert len(orders) > 1  # the seed changes the batch order
    plain = collect(D.iterate_batches(examples, 4, 32, shuffle=False))
    widths = [b[0].shape[1] for b in plain]
    assert widths == sorted(widths)


def test_mixed_length_batches():
    """by_length=False (--mixed-lengths): batches of randomly drawn examples, deterministic by seed, every
    example once an epoch; sorted batches of the same data hold near-equal lengths."""
    lengths = [3, 30, 4, 28, 5, 26, 6, 24, 7, 22, 8, 20]
    examples = make_examples(lengths)

    def groups(batches):
        return [sorted(lengths[int(i) - 1000] for i in b[0][:, 0]) for b in batches]

    mixed = collect(D.iterate_batches(examples, 4, 64, seed=3, shuffle=False, by_length=False))
    assert collect(D.iterate_batches(examples, 4, 64, seed=3, shuffle=False, by_length=False))[0][0].tolist() == \
        mixed[0][0].tolist()
    assert sorted(x for g in groups(mixed) for x in g) == sorted(lengths)
    sorted_groups = groups(collect(D.iterate_batches(examples, 4, 64, shuffle=False)))
    assert sorted_groups == [[3, 4, 5, 6], [7, 8, 20, 22], [24, 26, 28, 30]]
    assert groups(mixed) != sorted_groups and max(g[-1] - g[0] for g in groups(mixed)) > 16


def test_loop_reshuffles_each_epoch_deterministically():
    examples = make_examples(range(2, 26))  # 24 examples, 6 batches per epoch
    it = D.iterate_batches(examples, 4, 64, seed=0, loop=True)
    epochs = [[int(next(it)[0][0, 0].item()) for _ in range(6)] for _ in range(4)]
    it2 = D.iterate_batches(examples, 4, 64, seed=0, loop=True)
    assert [[int(next(it2)[0][0, 0].item()) for _ in range(6)] for _ in range(4)] == epochs
    assert all(sorted(e) == sorted(epochs[0]) for e in epochs)  # each epoch: every batch once
    assert len({tuple(e) for e in epochs}) > 1  # in new orders


def test_truncation_and_count():
    examples = make_examples([4, 10, 11, 12, 30])
    assert D.count_truncated(examples, 10) == 2  # more than 11 tokens: 12 and 30
    assert D.count_truncated(examples, 9) == 3 and D.count_truncated(examples, 100) == 0
    assert D.truncation_warning(examples, 10) == (
        "2 of 5 examples longer than 11 tokens (max_seq_length 10 + 1) are truncated")
    assert D.truncation_warning(examples, 100) is None
    inputs, targets, mask = collect(D.iterate_batches(examples, 5, 10, shuffle=False))[0]
    assert inputs.shape == (5, 10) and mask.sum(axis=1).tolist() == [3, 9, 10, 10, 10]
    assert inputs[-1].tolist() == [1004] + list(range(1, 10)) and targets[-1].tolist() == list(range(1, 11))


def test_packing():
    lengths = [5, 9, 3, 7, 6]
    examples = make_examples(lengths)
    stream = [t for ids, _ in examples for t in ids]
    batches = collect(D.iterate_batches(examples, 2, 8, shuffle=False, pack=True))
    rows = [(i, t, m) for inputs, targets, mask in batches for i, t, m in zip(inputs, targets, mask)]
    assert len(rows) == 4  # 30 tokens -> windows starting at 0, 8, 16, 24
    assert all(inputs.shape[1] == 8 for inputs, _, _ in batches)
    targets = sorted(int(t) for _, ts, ms in rows for t, m in zip(ts, ms) if m)
    assert targets == sorted(stream[1:])  # every token after the first is a target exactly once
    full = [r for r in rows if r[2].all()]
    assert len(full) == 3 and sorted(r[0][0] for r in full) == sorted(stream[s] for s in (0, 8, 16))
    with pytest.raises(Phi3MLXError, match="packing gives 4 sequences of 9 tokens, fewer than the batch size 5"):
        D.iterate_batches(examples, 5, 8, pack=True)


def test_batch_size_and_length_errors():
    with pytest.raises(Phi3MLXError, match="^3 examples are fewer than the batch size 4$"):
        D.iterate_batches(make_examples([3, 4, 5]), 4, 16)  # raised at the call, not on first next()
    with pytest.raises(Phi3MLXError, match="batch size must be at least 1, got 0; max_seq_length must be at least 1"):
        D.iterate_batches(make_examples([3]), 0, 0)
    with pytest.raises(Phi3MLXError, match="fewer than the batch size"):
        D.iterate_preference_batches([([1], [2], [3])], 2, 16)


# --- preference batches -----------------------------------------------------------------------------


def test_preference_batches(tok):
    rows = [ROWS["preference"], {"prompt": CHAT[:4], "chosen": "Good.", "rejected": "Go away, I am busy now."}]
    examples = [D.encode_preference(r, "preference", tok) for r in rows]
    batch = next(D.iterate_preference_batches(examples, 2, 256, shuffle=False))
    assert set(batch) == {"chosen", "rejected"}
    for side, k in (("chosen", 1), ("rejected", 2)):
        inputs, targets, mask = (np.array(a) for a in batch[side])
        assert inputs.shape == np.array(batch["chosen"][0]).shape and mask.dtype == np.float32
        for r, (prompt, *resp) in enumerate(examples):  # shuffle=False: shortest first = rows order here
            response = resp[k - 1]
            assert targets[r][mask[r] == 1].tolist() == response  # loss on the response only
            n = len(prompt) + len(response) - 1
            assert inputs[r, :n].tolist() == (prompt + response)[:-1] and mask[r, n:].sum() == 0
            assert mask[r, : len(prompt) - 1].sum() == 0


def test_preference_truncation_rule():
    prompt, chosen, rejected = list(range(100, 130)), list(range(200, 240)), list(range(300, 305))
    p, c, r = D.truncate_preference(prompt, chosen, rejected, 19)  # budget 20 tokens
    assert (p, c, r) == (prompt[-10:], chosen[:10], rejected)  # prompt end and response start kept
    p, c, r = D.truncate_preference(prompt[:4], chosen, rejected, 19)
    assert (p, c, r) == (prompt[:4], chosen[:16], rejected)  # a short prompt stays whole
    p, c, r = D.truncate_preference(prompt, chosen[:3], rejected, 19)
    assert (p, c, r) == (prompt[-15:], chosen[:3], rejected)  # short responses stay whole
    assert D.truncate_preference(prompt[:5], chosen[:5], rejected, 19) == (prompt[:5], chosen[:5], rejected)
    assert D.count_truncated([(prompt, chosen, rejected), (prompt[:5], chosen[:5], rejected)], 19) == 1
    batch = next(D.iterate_preference_batches([(prompt, chosen, rejected)], 1, 19))
    inputs, targets, mask = (np.array(a) for a in batch["chosen"])
    assert inputs.shape == (1, 19) and targets[0][mask[0] == 1].tolist() == chosen[:10]
    assert inputs[0, 0] == prompt[-10]


def test_summarize():
    sft = make_examples([4, 10]) + [([1, 2, 3], [0, 0, 1])]
    assert D.summarize(sft) == {"n": 3, "tokens": 17, "targets": 3 + 9 + 1, "max_length": 10, "mean_length": 17 / 3}
    pref = [([1, 2], [3, 4, 5], [6]), ([1], [2], [3, 4])]
    assert D.summarize(pref) == {"n": 2, "tokens": 10, "targets": 7, "max_length": 5, "mean_length": 4.0}
    assert D.summarize([])["n"] == 0 and D.summarize([])["max_length"] == 0
