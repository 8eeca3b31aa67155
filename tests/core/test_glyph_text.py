"""Quoted-text extraction, the ByT5 byte tokenizer and the span-count pad quirk (spec §4.4)."""
import warnings

import pytest
import torch

from glm_image_core.networks.glyph import GlyphT5Encoder
from glm_image_core.generation.glyph_text import ByT5Tokenizer, encode_glyph_texts, extract_glyph_texts, load_glyph_tokenizer, pad_glyph_batch


@pytest.mark.parametrize("prompt,expected", [
    ("a cat on a mat", [""]),
    ("", [""]),
    ('a sign that says "hello"', ["hello"]),
    ("a sign 'Hi' and “Yo”", ["Hi", "Yo"]),
    # grouped by quote type, not by position: ' first, then “”, then ", then 「」
    ('"A" 「B」 “C” \'D\'', ["D", "C", "A", "B"]),
    ("「你好」 and 「世界」", ["你好", "世界"]),
    # apostrophe quirk: apostrophes pair up like single quotes
    ("don't do it, it's 'fine'", ["t do it, it", "fine"]),
    ("it's", [""]),
    ("''", [""]),                 # an empty quoted span is still a span
    ('"" and ""', ["", ""]),
    ("“unterminated", [""]),
])
def test_extract_glyph_texts(prompt, expected):
    assert extract_glyph_texts(prompt) == expected


def test_extract_rejects_non_str():
    with pytest.raises(TypeError):
        extract_glyph_texts(None)


def test_byte_ids_and_eos():
    tok = ByT5Tokenizer()
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert tok.encode("") == [1]
    assert tok.encode("Hi") == [ord("H") + 3, ord("i") + 3, 1] == [75, 108, 1]
    assert tok.encode("é") == [0xC3 + 3, 0xA9 + 3, 1]
    assert tok.encode("😀") == [b + 3 for b in "😀".encode("utf-8")] + [1]
    assert tok.encode("世") == [0xE4 + 3, 0xB8 + 3, 0x96 + 3, 1]


def test_special_strings_and_truncation():
    tok = ByT5Tokenizer()
    assert tok.encode("<pad>a") == [0, 100, 1]
    assert tok.encode("x </s> y") == [123, 1, 124, 1]            # stripped around </s>
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert tok.encode("ab</s>") == [100, 101, 1]               # no second EOS
    assert tok.encode("a<extra_id_0>b") == [100, 259, 101, 1]
    long = tok.encode("a" * 5000)
    assert len(long) == 2048 and long[-1] == 1 and set(long[:-1]) == {100}
    assert len(tok.encode("a" * 5000, max_length=16)) == 16


def test_tokenizer_from_checkpoint_folder(tiny_ckpt):
    tok = load_glyph_tokenizer(f"{tiny_ckpt}/tokenizer")
    assert tok.encode("Yo") == [92, 114, 1]
    assert tok.added_tokens_encoder["<extra_id_0>"] == 259
    assert len(tok) == 384


class _RecordingEncoder(GlyphT5Encoder):
    """A real (random) T5 encoder that records the ids and mask it is called with."""

    def forward(self, input_ids, attention_mask=None):
        self.calls.append((input_ids.clone(), attention_mask.clone()))
        return super().forward(input_ids, attention_mask)


def _tiny_encoder():
    torch.manual_seed(0)
    enc = _RecordingEncoder({"vocab_size": 384, "d_model": 16, "d_kv": 4, "d_ff": 32, "num_layers": 2,
                             "num_heads": 4, "relative_attention_num_buckets": 8,
                             "relative_attention_max_distance": 16}).eval()
    for p in enc.parameters():
        torch.nn.init.normal_(p, std=0.5)
    enc.calls = []
    return enc


def test_even_span_count_prepends_pad_to_every_span():
    enc, tok = _tiny_encoder(), ByT5Tokenizer()
    spans = extract_glyph_texts("a sign 'Hi' and “Yo”")
    out = encode_glyph_texts(enc, tok, spans, "cpu", torch.float32)
    ids, mask = enc.calls[-1]
    assert ids.tolist() == [[0, 75, 108, 1], [0, 92, 114, 1]]
    assert mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1]]
    assert out.shape == (1, 8, 16)


def test_odd_span_count_has_no_prefix_and_right_pads():
    enc, tok = _tiny_encoder(), ByT5Tokenizer()
    out = encode_glyph_texts(enc, tok, ["a", "bb", "ccc"], "cpu", torch.float32)
    ids, mask = enc.calls[-1]
    assert ids.tolist() == [[100, 1, 0, 0], [101, 101, 1, 0], [102, 102, 102, 1]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    assert out.shape == (1, 2 + 3 + 4, 16)
    # each span's states equal encoding it alone (padding is masked out of attention)
    alone = encode_glyph_texts(enc, tok, ["bb"], "cpu", torch.float32)
    assert torch.allclose(out[0, 2:5], alone[0], atol=1e-5)


def test_empty_prompt_glyph_is_single_eos_token():
    enc, tok = _tiny_encoder(), ByT5Tokenizer()
    out = encode_glyph_texts(enc, tok, [""], "cpu", torch.float32)
    assert enc.calls[-1][0].tolist() == [[1]]
    assert out.shape == (1, 1, 16)
    assert torch.equal(encode_glyph_texts(enc, tok, [], "cpu", torch.float32), out)


def test_pad_glyph_batch_left_pads_with_zeros():
    a, b = torch.ones(1, 2, 3), 2 * torch.ones(1, 4, 3)
    out = pad_glyph_batch([a, b])
    assert out.shape == (2, 4, 3)
    assert out[0, :2].abs().sum() == 0 and torch.equal(out[0, 2:], a[0]) and torch.equal(out[1], b[0])
