"""Text in and out of a decoder: the tokenizers library over tokenizer.json, the chat template, streaming text with
stop strings."""

import json

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from onnxshard import decoder_models as dm
from onnxshard.errors import InputError, ModelError
from onnxshard.text import TextCodec, TextStream


@pytest.fixture
def codec(tmp_path):
    dm.save_tokenizer(tmp_path)
    return TextCodec.load(tmp_path)


def test_the_codec_reads_tokenizer_json_and_its_config(codec, tmp_path):
    assert codec.encode("w7 w9 w5") == [7, 9, 5]
    assert codec.decode([1, 7, 9, 2]) == "w7 w9"  # special tokens are not text
    assert codec.eos_token_id == 2 and codec.bos_token == "<s>"
    assert TextCodec.find(tmp_path / "nowhere", tmp_path).encode("w6") == [6]
    assert TextCodec.find(tmp_path / "nowhere") is None


def test_the_chat_template_renders_in_a_sandbox(codec, tmp_path):
    prompt = codec.chat_prompt([{"role": "user", "content": "w8 w9"}])
    assert prompt == "<user> w8 w9 <assistant> "
    assert codec.encode(prompt) == [3, 8, 9, 4]
    codec.chat_template = "{{ messages.__class__.__mro__ }}"  # the sandbox refuses reaching into Python
    with pytest.raises(InputError, match="chat template"):
        codec.chat_prompt([{"role": "user", "content": "x"}])
    codec.chat_template = "{{ raise_exception('only user turns') }}"
    with pytest.raises(InputError, match="only user turns"):
        codec.chat_prompt([{"role": "system", "content": "x"}])
    codec.chat_template = None
    with pytest.raises(InputError, match="no chat_template"):
        codec.chat_prompt([])


def test_a_broken_tokenizer_file_is_refused_by_name(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelError, match="tokenizer.json"):
        TextCodec.load(tmp_path)


def test_streamed_text_ends_before_a_stop_string_split_over_tokens(codec):
    ids = codec.encode("w10 w11 w12 w13 w14")
    stream = TextStream(codec, ["w12 w1"])
    pieces = [stream.push(t) for t in ids]
    assert "".join(pieces) + stream.flush() == "w10 w11 " and stream.stopped
    assert pieces == ["w10", " w11", " ", "", ""]  # "w12" is held while it may start the stop string
    plain = TextStream(codec, ["nowhere"])
    assert "".join(plain.push(t) for t in ids) + plain.flush() == "w10 w11 w12 w13 w14" and not plain.stopped


def test_a_character_split_over_byte_tokens_is_held_until_whole(tmp_path):
    alphabet = {"<unk>": 0, **{f"<0x{b:02X}>": b + 1 for b in range(256)}}
    tokenizer = Tokenizer(models.BPE(alphabet, [], unk_token="<unk>", byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({}))
    codec = TextCodec.load(tmp_path)
    euro = [0xE2 + 1, 0x82 + 1, 0xAC + 1]  # "€" in three byte tokens
    stream = TextStream(codec)
    assert [stream.push(t) for t in euro] == ["", "", "€"]
