import json

import pytest
import torch
from transformers import AutoTokenizer

from allo_train import data
from allo_train.tokenizer import SIMPLE_CHAT_TEMPLATE, build_char_tokenizer

PAD, BOS, EOS = 0, 1, 2


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def chat_tok():
    return build_char_tokenizer(chat_template=SIMPLE_CHAT_TEMPLATE)


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_char_tokenizer_round_trips_through_save_pretrained(tmp_path):
    tok = build_char_tokenizer(save_dir=tmp_path, chat_template=SIMPLE_CHAT_TEMPLATE)
    again = AutoTokenizer.from_pretrained(str(tmp_path))
    text = "Hi there!\n 42"
    assert ids(again, text) == ids(tok, text) and len(ids(tok, text)) == len(text)
    assert again(text)["input_ids"][0] == BOS
    assert (again.pad_token_id, again.bos_token_id, again.eos_token_id) == (PAD, BOS, EOS)
    assert again.decode(ids(again, text)) == text
    assert again.chat_template == SIMPLE_CHAT_TEMPLATE


def test_preference_strings_tokenize_with_prompt_masked_and_collate_chosen_then_rejected(tmp_path, tok):
    path = write_jsonl(
        tmp_path / "pref.jsonl",
        [
            {"prompt": "Q1 ", "chosen": "good", "rejected": "bad"},
            "",
            {"prompt": "Q22 ", "chosen": "ok", "rejected": "nope!"},
        ],
    )
    examples = data.load_preference_jsonl(path)
    assert [e.source for e in examples] == [f"{path}:1", f"{path}:3"]  # blank line skipped, numbers kept
    feats = data.tokenize_preference(examples, tok, max_length=64, max_prompt_length=16)
    f0 = feats[0]
    assert f0["chosen_input_ids"] == [BOS] + ids(tok, "Q1 ") + ids(tok, "good") + [EOS]
    assert f0["chosen_labels"] == [-100] * 4 + ids(tok, "good") + [EOS]
    assert f0["rejected_labels"] == [-100] * 4 + ids(tok, "bad") + [EOS]

    batch = data.PreferenceCollator(pad_token_id=PAD)(feats)
    assert batch["input_ids"].shape == (4, 11)  # 2B rows; longest = BOS + "Q22 " + "nope!" + EOS
    rows = [
        feats[0]["chosen_input_ids"],
        feats[1]["chosen_input_ids"],
        feats[0]["rejected_input_ids"],
        feats[1]["rejected_input_ids"],
    ]
    for r, row in enumerate(rows):
        n = len(row)
        assert batch["input_ids"][r, :n].tolist() == row
        assert batch["input_ids"][r, n:].eq(PAD).all()
        assert batch["attention_mask"][r].tolist() == [1] * n + [0] * (11 - n)
        assert batch["labels"][r, n:].eq(-100).all()
    assert batch["labels"][3].tolist() == [-100] * 5 + ids(tok, "nope!") + [EOS]
    padded = data.PreferenceCollator(pad_token_id=PAD, pad_to_multiple_of=8)(feats)
    assert padded["input_ids"].shape == (4, 16)


def test_truncation_keeps_prompt_end_and_response_start(tok):
    ex = data.PreferenceExample("abcdefgh", "12345678", "xy", source="mem:1")
    (f,) = data.tokenize_preference([ex], tok, max_length=8, max_prompt_length=4)
    assert f["chosen_input_ids"][:4] == ids(tok, "efgh")  # last 4 prompt tokens (BOS dropped with the start)
    assert f["chosen_input_ids"][4:] == ids(tok, "1234")  # response cut to max_length - 4
    assert f["chosen_labels"] == [-100] * 4 + ids(tok, "1234")
    assert f["rejected_input_ids"] == ids(tok, "efgh") + ids(tok, "xy") + [EOS]


def test_chat_messages_use_the_template_and_mark_only_the_response(tmp_path, chat_tok, tok):
    prompt = [{"role": "user", "content": "hi"}]
    path = write_jsonl(
        tmp_path / "chat.jsonl",
        [{"prompt": prompt, "chosen": [{"role": "assistant", "content": "yo"}], "rejected": "no"}],
    )
    (ex,) = data.load_preference_jsonl(path)
    assert ex.rejected == [{"role": "assistant", "content": "no"}]  # a string response after messages
    (f,) = data.tokenize_preference([ex], chat_tok, max_length=64, max_prompt_length=32)
    prompt_text = "<bos><|user|>hi\n<|assistant|>"
    # "<bos>" etc. are special tokens: one id each.
    assert chat_tok.decode(f["chosen_input_ids"]) == prompt_text + "yo\n"
    n_prompt = len(chat_tok(prompt_text, add_special_tokens=False)["input_ids"])
    assert f["chosen_labels"][:n_prompt] == [-100] * n_prompt
    assert f["chosen_labels"][n_prompt:] == ids(chat_tok, "yo\n")  # the template's turn end, no EOS appended
    # Without a chat template: plain "role: content" rendering, BOS/EOS added like strings.
    p, r, n_core = data.encode_prompt_response(tok, prompt, [{"role": "assistant", "content": "yo"}])
    assert p == [BOS] + ids(tok, "user: hi\nassistant: ") and r == ids(tok, "yo") + [EOS] and n_core == 2


@pytest.mark.parametrize(
    "line, fragment",
    [
        ('{"prompt": "a", "chosen": "b"', "invalid JSON"),
        ('["prompt"]', "must be a JSON object"),
        ('{"prompt": "a", "chosen": "b"}', "missing field 'rejected'"),
        ('{"prompt": "a", "chosen": 3, "rejected": "c"}', "field 'chosen' must be a string or a non-empty list"),
        ('{"prompt": "a", "chosen": [{"role": "assistant"}], "rejected": "c"}', "field 'chosen' message 0"),
        ('{"prompt": "a", "chosen": [{"role": "assistant", "content": "x"}], "rejected": "c"}', "prompt' is a string"),
    ],
)
def test_malformed_preference_line_names_file_and_line(tmp_path, line, fragment):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}, line])
    with pytest.raises(ValueError) as err:
        data.load_preference_jsonl(path)
    assert str(err.value).startswith(f"{path}:2: ") and fragment in str(err.value)


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": "a", "chosen": "b"', "invalid JSON at column 30 (the end of the line): Expecting ',' delimiter"),
        ('{"prompt": "a",, "chosen": "b"}', "invalid JSON at column 16: Expecting property name"),
        ('{"prompt": tru}\r', "invalid JSON at column 12: Expecting value"),
    ],
)
def test_invalid_json_names_the_column_within_the_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n' + line.encode() + b"\n")
    with pytest.raises(ValueError) as err:
        data.load_preference_jsonl(path)
    assert str(err.value).startswith(f"{path}:2: {message}")


def test_forgetting_token_weights_align_with_labels_and_length_mismatch_names_line(tmp_path, tok):
    path = write_jsonl(
        tmp_path / "f.jsonl",
        [
            {"prompt": "Q:", "rejected": "abc", "token_weights": [0.5, 0, 2]},
            {"prompt": "Q:", "rejected": "de", "token_weights": [1, 1]},
        ],
    )
    feats = data.tokenize_forgetting(data.load_forgetting_jsonl(path), tok, max_length=32, max_prompt_length=8)
    batch = data.ForgettingCollator(pad_token_id=PAD)(feats)
    assert batch["token_weights"].dtype == torch.float32
    assert batch["token_weights"].tolist() == [[0, 0, 0, 0.5, 0, 2, 0], [0, 0, 0, 1, 1, 0, 0]]
    assert batch["labels"][0].tolist() == [-100, -100, -100] + ids(tok, "abc") + [EOS]
    # Weights are zero wherever labels are ignored.
    assert batch["token_weights"][batch["labels"] == -100].eq(0).all()
    # Truncation cuts the weights with the response.
    (short,) = data.tokenize_forgetting(data.load_forgetting_jsonl(path)[:1], tok, max_length=5, max_prompt_length=3)
    assert short["input_ids"] == [BOS] + ids(tok, "Q:ab") and short["token_weights"] == [0, 0, 0, 0.5, 0]

    bad = write_jsonl(
        tmp_path / "g.jsonl",
        [
            {"prompt": "Q:", "rejected": "de", "token_weights": [1, 1]},
            {"prompt": "Q:", "rejected": "abc", "token_weights": [1, 1]},
        ],
    )
    examples = data.load_forgetting_jsonl(bad)
    with pytest.raises(ValueError, match=rf"^{bad}:2: 'token_weights' has 2 values but the rejected response has 3"):
        data.tokenize_forgetting(examples, tok, max_length=32, max_prompt_length=8)
    assert data.response_token_ids(tok, "Q:", "abc") == ids(tok, "abc")

    for row, fragment in [
        ({"prompt": "Q", "rejected": "a"}, "missing field 'token_weights'"),
        ({"prompt": "Q", "rejected": "a", "token_weights": ["x"]}, "list of finite numbers"),
    ]:
        p = write_jsonl(tmp_path / "h.jsonl", [row])
        with pytest.raises(ValueError, match=rf"^{p}:1: .*{fragment}"):
            data.load_forgetting_jsonl(p)


def test_corrected_token_weights_mark_the_minimal_edit():
    assert data.corrected_token_weights([1, 2, 3, 4], [1, 2, 9, 4]) == [0, 0, 1, 0]  # replace
    assert data.corrected_token_weights([1, 2, 3, 4], [1, 4]) == [0, 1, 1, 0]  # delete
    assert data.corrected_token_weights([1, 2, 3, 4], [1, 2, 7, 3, 4]) == [0, 0, 1, 0]  # insert: token at the gap
    assert data.corrected_token_weights([1, 2, 3], [1, 2, 3]) == [0, 0, 0]
    assert data.corrected_token_weights([5, 6], [7, 8, 9]) == [1, 1]


def test_forgetting_from_corrected_responses(tmp_path, tok):
    path = write_jsonl(
        tmp_path / "c.jsonl",
        [
            {"prompt": "Q", "rejected": "2+2=5", "corrected": "2+2=4"},
            {"prompt": "Q", "rejected": "ab", "corrected": "abc"},
        ],
    )
    feats = data.tokenize_forgetting(
        data.load_forgetting_jsonl(path, token_weight_source="corrected"), tok, max_length=32, max_prompt_length=8
    )
    assert feats[0]["token_weights"] == [0, 0] + [0, 0, 0, 0, 1] + [0]  # only "5"
    assert feats[1]["token_weights"] == [0, 0] + [0, 0] + [1]  # appended text: the rejected EOS ended too early
    with pytest.raises(ValueError, match=rf"^{path}:1: missing field 'token_weights'"):
        data.load_forgetting_jsonl(path)
    # Scoring-model source: no weights in the data, none in the batch.
    feats = data.tokenize_forgetting(
        data.load_forgetting_jsonl(path, token_weight_source="scoring_model"), tok, max_length=32, max_prompt_length=8
    )
    assert "token_weights" not in data.ForgettingCollator(pad_token_id=PAD)(feats)


def test_correction_format_identity_warmup_and_sft(tmp_path, tok):
    rows = [{"question": f"q{i}", "answer": f"a{i}", "correction": f"c{i}"} for i in range(10)]
    path = write_jsonl(tmp_path / "qac.jsonl", rows)
    examples = data.load_correction_jsonl(path)
    (f,) = data.tokenize_correction(examples[:1], tok, max_length=64, max_prompt_length=48)
    prompt = [BOS] + ids(tok, "##Question: q0\n##Answer: a0\n##Correction: ")
    assert f["input_ids"] == prompt + ids(tok, "c0") + [EOS]
    assert f["labels"] == [-100] * len(prompt) + ids(tok, "c0") + [EOS]

    warm = data.identity_warmup_examples(examples, fraction=0.2, seed=3)
    assert len(warm) == 2 and all(w.correction == w.answer for w in warm)
    assert [w.question for w in warm] == [
        w.question for w in data.identity_warmup_examples(examples, fraction=0.2, seed=3)
    ]
    assert data.identity_warmup_examples(examples, fraction=0.0, seed=3) == []

    bad = write_jsonl(tmp_path / "bad.jsonl", rows[:2] + [{"question": "q", "answer": 1, "correction": "c"}])
    with pytest.raises(ValueError, match=rf"^{bad}:3: field 'answer' must be a string, got int 1"):
        data.load_correction_jsonl(bad)

    sft = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "P", "completion": "done", "chosen": "alt"}])
    (s,) = data.tokenize_sft(data.load_sft_jsonl(sft), tok, max_length=32, max_prompt_length=8)
    assert s["labels"] == [-100, -100] + ids(tok, "done") + [EOS]
    (s2,) = data.tokenize_sft(
        data.load_sft_jsonl(sft, completion_field="chosen"), tok, max_length=32, max_prompt_length=8
    )
    assert s2["input_ids"] == [BOS] + ids(tok, "Palt") + [EOS]
    batch = data.SFTCollator(pad_token_id=PAD)([s, s2])
    assert batch["labels"][1].tolist() == [-100, -100] + ids(tok, "alt") + [EOS, -100]


def test_train_eval_split_is_deterministic_and_disjoint():
    items = list(range(50))
    train, held = data.train_eval_split(items, eval_fraction=0.1, seed=1)
    assert len(held) == 5 and sorted(train + held) == items and train == sorted(train) and held == sorted(held)
    assert data.train_eval_split(items, eval_fraction=0.1, seed=1) == (train, held)
    assert data.train_eval_split(items, eval_fraction=0.1, seed=2)[1] != held
    assert data.train_eval_split(items, eval_fraction=0.0, seed=1) == (items, [])
    assert len(data.train_eval_split(items[:3], eval_fraction=0.1, seed=1)[1]) == 1


def test_resumable_sampler_resumes_mid_epoch_and_shards():
    s = data.ResumableSampler(10, seed=5)
    it = iter(s)
    first = [next(it) for _ in range(4)]
    state = s.state_dict()
    assert state == {"epoch": 0, "position": 4}
    rest = list(it)
    assert sorted(first + rest) == list(range(10))
    resumed = data.ResumableSampler(10, seed=5)
    resumed.load_state_dict(state)
    assert list(resumed) == rest and resumed.state_dict() == {"epoch": 1, "position": 0}
    assert list(s) == s.epoch_indices(1) != s.epoch_indices(0)  # a new order each epoch
    shards = [data.ResumableSampler(7, seed=0, rank=r, world_size=2).epoch_indices(0) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 4 and set(shards[0]) | set(shards[1]) == set(range(7))
    loader = torch.utils.data.DataLoader(
        list(range(10)), batch_size=3, sampler=data.ResumableSampler(10, shuffle=False)
    )
    assert [b.tolist() for b in loader] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]


# ---- issue 11: bad values and bytes named at load time; silent surprises warned once, with counts
@pytest.mark.parametrize(
    "weights, fragment",
    [
        ("[1, -0.5]", "value 1 is -0.5; token weights must be in [0, 1000]"),
        ("[1e30, 1]", "value 0 is 1e+30; token weights must be in [0, 1000]"),
        ("[NaN, 1]", "must be a list of finite numbers, got list [nan, 1]"),
        ("[1, Infinity]", "must be a list of finite numbers, got list [1, inf]"),
    ],
)
def test_bad_token_weights_name_file_and_line_at_load(tmp_path, weights, fragment):
    path = tmp_path / "w.jsonl"
    path.write_text(
        '{"prompt": "Q", "rejected": "ab", "token_weights": [1, 1]}\n'
        f'{{"prompt": "Q", "rejected": "ab", "token_weights": {weights}}}\n'
    )
    with pytest.raises(ValueError) as err:
        data.load_forgetting_jsonl(path)
    assert str(err.value).startswith(f"{path}:2: field 'token_weights' ") and fragment in str(err.value)


def test_bytes_that_are_not_utf8_name_file_line_and_column(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(
        b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n\n{"prompt": "caf\xe9", "chosen": "b", "rejected": "c"}\n'
    )
    with pytest.raises(ValueError) as err:
        data.load_preference_jsonl(path)
    assert str(err.value).startswith(f"{path}:3: not valid UTF-8 (byte 0xe9 at column 16")


def test_all_zero_token_weights_train_nothing_and_are_refused(tmp_path, tok, caplog):
    rows = [
        {"prompt": "Q", "rejected": "ab", "token_weights": [0, 0]},
        {"prompt": "Q", "rejected": "cd", "token_weights": [0, 1]},
        {"prompt": "Q", "rejected": "", "token_weights": []},  # an empty response: only the unweighted EOS
        {"prompt": "Q", "rejected": "efgh", "token_weights": [0, 0, 0, 1]},  # its weighted token is cut below
    ]
    path = write_jsonl(tmp_path / "z.jsonl", rows)
    with caplog.at_level("WARNING", logger="allo_train"):
        feats = data.tokenize_forgetting(data.load_forgetting_jsonl(path), tok, max_length=5, max_prompt_length=2)
    assert len(feats) == 4
    (line,) = [r.getMessage() for r in caplog.records if "token weight 0" in r.getMessage()]
    assert line == (
        f"[allo-train] warning: {path}: 3 of 4 examples have token weight 0 on all the response tokens they keep "
        "(lines 1, 3, 4): they add nothing to the forgetting loss"
    )
    zero = write_jsonl(tmp_path / "zero.jsonl", [rows[0], rows[2]])
    with pytest.raises(ValueError, match=rf"^{zero}: every example \(2\) has token weight 0 .* would train nothing"):
        data.tokenize_forgetting(data.load_forgetting_jsonl(zero), tok, max_length=32, max_prompt_length=8)
    same = write_jsonl(tmp_path / "same.jsonl", [{"prompt": "Q", "rejected": "ab", "corrected": "ab"}])
    examples = data.load_forgetting_jsonl(same, token_weight_source="corrected")
    with pytest.raises(ValueError, match="'corrected' responses equal to 'rejected'"):
        data.tokenize_forgetting(examples, tok, max_length=32, max_prompt_length=8)


def test_truncation_and_identical_pairs_are_warned_once_with_counts(tmp_path, tok, caplog):
    rows = [
        {"prompt": "1234567890", "chosen": "ab", "rejected": "cd"},  # prompt cut
        {"prompt": "Q", "chosen": "same", "rejected": "same"},  # identical
        {"prompt": "Q", "chosen": "abcdefghijkl", "rejected": "abcdefghijkX"},  # both cut, identical once cut
        {"prompt": "Q", "chosen": "x", "rejected": "y"},
    ]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    with caplog.at_level("WARNING", logger="allo_train"):
        data.tokenize_preference(data.load_preference_jsonl(path), tok, max_length=10, max_prompt_length=4)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        f"[allo-train] warning: {path}: 1 of 4 pairs have a prompt longer than max_prompt_length=4 tokens; it keeps "
        "only its last 4 (lines 1)",
        f"[allo-train] warning: {path}: 1 of 4 pairs have a response cut to fit max_length=10 tokens together with "
        "its prompt (lines 3)",
        f"[allo-train] warning: {path}: 2 of 4 pairs have the same chosen and rejected tokens after truncation "
        "(lines 2, 3): DPO gives them loss log 2 and no gradient",
    ]
    caplog.clear()
    with caplog.at_level("WARNING", logger="allo_train"):
        data.tokenize_preference(data.load_preference_jsonl(path), tok, max_length=64, max_prompt_length=32)
    assert [r.getMessage().split(": ")[-1] for r in caplog.records] == ["DPO gives them loss log 2 and no gradient"]
    sft = write_jsonl(
        tmp_path / "s.jsonl", [{"prompt": "Q", "completion": "abcdefgh"}, {"prompt": "Q", "completion": "a"}]
    )
    caplog.clear()
    with caplog.at_level("WARNING", logger="allo_train"):
        data.tokenize_sft(data.load_sft_jsonl(sft), tok, max_length=6, max_prompt_length=3)
    assert [r.getMessage() for r in caplog.records] == [
        f"[allo-train] warning: {sft}: 1 of 2 examples have a response cut to fit max_length=6 tokens together with "
        "its prompt (lines 1)"
    ]
