"""Decoder LLMs with a KV cache, built in code the way optimum / transformers export them (no downloads).

Inputs ``input_ids`` [batch, seq], ``attention_mask`` [batch, past + seq] (int64, 0 = padding),
``position_ids`` [batch, seq] and ``past_key_values.{i}.key/.value`` [batch, kv_heads, past, head_dim];
outputs ``logits`` [batch, seq, vocab] and ``present.{i}.key/.value`` [batch, kv_heads, past + seq, head_dim]
(the past with this call's keys and values appended). The prelude every layer reads (the 4-D additive mask made
from ``attention_mask`` and the causal rule, and for Llama the RoPE cos/sin made from ``position_ids``) is built
once at the start of the graph, as in real exports.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from onnxshard.models import make_model, weight


def gpt2_cached(layers=2, d=64, heads=4, vocab=512, max_positions=256, seed=0):
    """GPT-2: learned position embeddings, LayerNorm, one fused QKV projection, GELU MLP, as many K/V heads as
    query heads."""
    return _decoder("gpt2", layers, d, heads, heads, 4 * d, vocab, max_positions, seed)


def llama_cached(layers=2, d=64, heads=8, kv_heads=2, ffn=128, vocab=512, seed=0):
    """Llama: RoPE from ``position_ids``, RMSNorm, grouped-query attention (``kv_heads`` cached heads each shared
    by heads / kv_heads query heads), SwiGLU MLP, no biases."""
    return _decoder("llama", layers, d, heads, kv_heads, ffn, vocab, 0, seed)


def _decoder(style, layers, d, heads, kv_heads, ffn, vocab, max_positions, seed):
    rng = np.random.default_rng(seed)
    hd, rep = d // heads, heads // kv_heads
    b = _Builder()
    b.const("q_heads", [0, 0, heads, hd]).const("kv_split", [0, 0, kv_heads, hd]).const("merge", [0, 0, d])
    b.const("one1", [1]).const("axis1", [1]).const("axes12", [1, 2]).const("zero", 0).const("step", 1)
    b.const("scale", np.float32(1.0 / np.sqrt(hd))).const("neg", np.float32(-1e4)).const("f0", np.float32(0))
    b.const("f1", np.float32(1.0))
    b.inits.append(weight(rng, "embed", vocab, d, scale=0.5))
    b.add("Gather", ["embed", "input_ids"], "tok")
    if style == "gpt2":
        b.inits.append(weight(rng, "wpe", max_positions, d, scale=0.5))
        b.add("Gather", ["wpe", "position_ids"], "pos")
        b.add("Add", ["tok", "pos"], "x")
    else:
        b.add("Identity", ["tok"], "x")
        _rope_prelude(b, hd)
    _mask_prelude(b)
    x = "x"
    for i in range(layers):
        p = f"layers.{i}."
        n1 = _norm(b, rng, style, x, p + "attn_norm", d)
        if style == "gpt2":
            b.inits += [weight(rng, p + "qkv", d, 3 * d, scale=0.15), weight(rng, p + "qkv_b", 3 * d, scale=0.1)]
            b.const(p + "sizes", [d, d, d])
            b.add("MatMul", [n1, p + "qkv"], p + "qkv_m").add("Add", [p + "qkv_m", p + "qkv_b"], p + "qkv_a")
            b.nodes.append(h.make_node("Split", [p + "qkv_a", p + "sizes"], [p + "q", p + "k", p + "v"], axis=2))
        else:
            b.inits += [weight(rng, p + "wq", d, d, scale=0.15), weight(rng, p + "wk", d, kv_heads * hd, scale=0.15),
                        weight(rng, p + "wv", d, kv_heads * hd, scale=0.15)]
            for w in "qkv":
                b.add("MatMul", [n1, p + "w" + w], p + w)
        b.add("Reshape", [p + "q", "q_heads"], p + "qr").add("Transpose", [p + "qr"], p + "qt", perm=[0, 2, 1, 3])
        for w in "kv":
            b.add("Reshape", [p + w, "kv_split"], p + w + "r").add("Transpose", [p + w + "r"], p + w + "t",
                                                                   perm=[0, 2, 1, 3])
        q, k = p + "qt", p + "kt"
        if style == "llama":
            q, k = _rotate(b, q, p + "q_rope", hd), _rotate(b, k, p + "k_rope", hd)
        b.add("Concat", [f"past_key_values.{i}.key", k], f"present.{i}.key", axis=2)
        b.add("Concat", [f"past_key_values.{i}.value", p + "vt"], f"present.{i}.value", axis=2)
        keys, values = f"present.{i}.key", f"present.{i}.value"
        if rep > 1:  # [B, KVH, T, hd] -> [B, KVH, rep, T, hd] -> [B, H, T, hd]
            b.const(p + "repeat", [1, 1, rep, 1, 1]).const(p + "all_heads", [0, heads, -1, hd]).const(p + "ax2", [2])
            for name, src in (("kh", keys), ("vh", values)):
                b.add("Unsqueeze", [src, p + "ax2"], p + name + "u").add("Expand", [p + name + "u", p + "repeat"],
                                                                        p + name + "e")
                b.add("Reshape", [p + name + "e", p + "all_heads"], p + name)
            keys, values = p + "kh", p + "vh"
        b.add("Transpose", [keys], p + "kT", perm=[0, 1, 3, 2]).add("MatMul", [q, p + "kT"], p + "s")
        b.add("Mul", [p + "s", "scale"], p + "ss").add("Add", [p + "ss", "attn_bias"], p + "sm")
        b.add("Softmax", [p + "sm"], p + "pr", axis=-1).add("MatMul", [p + "pr", values], p + "ctx")
        b.add("Transpose", [p + "ctx"], p + "ct", perm=[0, 2, 1, 3]).add("Reshape", [p + "ct", "merge"], p + "cm")
        b.inits.append(weight(rng, p + "wo", d, d, scale=0.15))
        b.add("MatMul", [p + "cm", p + "wo"], p + "o").add("Add", [x, p + "o"], p + "res1")
        n2 = _norm(b, rng, style, p + "res1", p + "mlp_norm", d)
        _mlp(b, rng, style, n2, p, d, ffn)
        b.add("Add", [p + "res1", p + "mlp_out"], p + "out")
        x = p + "out"
    final = _norm(b, rng, style, x, "final_norm", d)
    b.inits.append(weight(rng, "lm_head", d, vocab, scale=0.3))
    b.add("MatMul", [final, "lm_head"], "logits")
    kv = lambda name, length: h.make_tensor_value_info(name, T.FLOAT, ["batch", kv_heads, length, hd])  # noqa: E731
    inputs = [h.make_tensor_value_info("input_ids", T.INT64, ["batch", "seq"]),
              h.make_tensor_value_info("attention_mask", T.INT64, ["batch", "total"]),
              h.make_tensor_value_info("position_ids", T.INT64, ["batch", "seq"])]
    outputs = [h.make_tensor_value_info("logits", T.FLOAT, ["batch", "seq", vocab])]
    for i in range(layers):
        for part in ("key", "value"):
            inputs.append(kv(f"past_key_values.{i}.{part}", "past"))
            outputs.append(kv(f"present.{i}.{part}", "total"))
    return make_model(b.nodes, inputs, outputs, b.inits)


class _Builder:
    def __init__(self):
        self.nodes, self.inits = [], []

    def add(self, op, inputs, output, **attrs):
        self.nodes.append(h.make_node(op, inputs, [output], **attrs))
        return self

    def const(self, name, value):
        value = np.asarray(value)
        self.inits.append(nh.from_array(value.astype(np.int64) if value.dtype.kind == "i" else value, name))
        return self


def _mask_prelude(b: _Builder) -> None:
    """``attn_bias`` [batch, 1, seq, total]: -1e4 where a key is padding or in a query's future. The queries are
    the last ``seq`` of the ``total`` positions, so padding must be on the left."""
    b.add("Shape", ["attention_mask"], "mask_shape").add("Shape", ["input_ids"], "ids_shape")
    b.add("Gather", ["mask_shape", "one1"], "total_1").add("Gather", ["ids_shape", "one1"], "seq_1")
    b.add("Squeeze", ["total_1"], "total_n").add("Squeeze", ["seq_1"], "seq_n")
    b.add("Sub", ["total_n", "seq_n"], "past_n")
    b.add("Range", ["zero", "total_n", "step"], "key_pos").add("Range", ["past_n", "total_n", "step"], "query_pos")
    b.add("Unsqueeze", ["query_pos", "axis1"], "query_col")
    b.add("LessOrEqual", ["key_pos", "query_col"], "visible")  # [seq, total]
    b.add("Where", ["visible", "f0", "neg"], "causal")
    b.add("Cast", ["attention_mask"], "mask_f", to=T.FLOAT).add("Sub", ["f1", "mask_f"], "mask_inv")
    b.add("Mul", ["mask_inv", "neg"], "pad_bias").add("Unsqueeze", ["pad_bias", "axes12"], "pad_bias4")
    b.add("Add", ["pad_bias4", "causal"], "attn_bias")


def _rope_prelude(b: _Builder, hd: int) -> None:
    """``rope_cos`` / ``rope_sin`` [batch, 1, seq, head_dim] from ``position_ids`` (base 10000, halves rotated)."""
    inv = 1.0 / (10000 ** (np.arange(0, hd, 2, dtype=np.float32) / hd))
    b.const("inv_freq", inv.astype(np.float32)).const("axis_last", [-1])
    b.add("Cast", ["position_ids"], "pos_f", to=T.FLOAT).add("Unsqueeze", ["pos_f", "axis_last"], "pos_col")
    b.add("Mul", ["pos_col", "inv_freq"], "freqs")
    b.nodes.append(h.make_node("Concat", ["freqs", "freqs"], ["angles"], axis=-1))
    b.add("Cos", ["angles"], "cos3").add("Sin", ["angles"], "sin3")
    b.add("Unsqueeze", ["cos3", "axis1"], "rope_cos").add("Unsqueeze", ["sin3", "axis1"], "rope_sin")


def _rotate(b: _Builder, x: str, out: str, hd: int) -> str:
    """x * cos + rotate_half(x) * sin, with rotate_half(x) = concat(-x[..., hd/2:], x[..., :hd/2])."""
    b.const(out + ".halves", [hd // 2, hd // 2])
    b.nodes.append(h.make_node("Split", [x, out + ".halves"], [out + ".x1", out + ".x2"], axis=-1))
    b.add("Neg", [out + ".x2"], out + ".nx2")
    b.nodes.append(h.make_node("Concat", [out + ".nx2", out + ".x1"], [out + ".rot"], axis=-1))
    b.add("Mul", [x, "rope_cos"], out + ".c").add("Mul", [out + ".rot", "rope_sin"], out + ".s")
    b.add("Add", [out + ".c", out + ".s"], out)
    return out


def _norm(b: _Builder, rng, style: str, x: str, name: str, d: int) -> str:
    b.inits.append(nh.from_array((1 + 0.1 * rng.standard_normal(d)).astype(np.float32), name + ".g"))
    if style == "gpt2":
        b.inits.append(nh.from_array((0.1 * rng.standard_normal(d)).astype(np.float32), name + ".b"))
        b.nodes.append(h.make_node("LayerNormalization", [x, name + ".g", name + ".b"], [name], axis=-1))
        return name
    b.const(name + ".two", np.float32(2)).const(name + ".eps", np.float32(1e-6))
    b.add("Pow", [x, name + ".two"], name + ".sq").add("ReduceMean", [name + ".sq"], name + ".ms", axes=[-1])
    b.add("Add", [name + ".ms", name + ".eps"], name + ".mse").add("Sqrt", [name + ".mse"], name + ".rms")
    b.add("Div", [x, name + ".rms"], name + ".n").add("Mul", [name + ".n", name + ".g"], name)
    return name


def _mlp(b: _Builder, rng, style: str, x: str, p: str, d: int, ffn: int) -> None:
    if style == "gpt2":
        b.inits += [weight(rng, p + "fc", d, ffn, scale=0.15), weight(rng, p + "fc_b", ffn, scale=0.1),
                    weight(rng, p + "proj", ffn, d, scale=0.15)]
        b.add("MatMul", [x, p + "fc"], p + "f1").add("Add", [p + "f1", p + "fc_b"], p + "f1b")
        b.const(p + "sqrt2", np.float32(np.sqrt(2.0))).const(p + "half", np.float32(0.5))
        b.add("Div", [p + "f1b", p + "sqrt2"], p + "g0").add("Erf", [p + "g0"], p + "g1")
        b.add("Add", [p + "g1", "f1"], p + "g2").add("Mul", [p + "f1b", p + "g2"], p + "g3")
        b.add("Mul", [p + "g3", p + "half"], p + "act")
        b.add("MatMul", [p + "act", p + "proj"], p + "mlp_out")
        return
    b.inits += [weight(rng, p + "w_gate", d, ffn, scale=0.15), weight(rng, p + "w_up", d, ffn, scale=0.15),
                weight(rng, p + "w_down", ffn, d, scale=0.15)]
    b.add("MatMul", [x, p + "w_gate"], p + "gate").add("Sigmoid", [p + "gate"], p + "sig")
    b.add("Mul", [p + "gate", p + "sig"], p + "silu").add("MatMul", [x, p + "w_up"], p + "up")
    b.add("Mul", [p + "silu", p + "up"], p + "h").add("MatMul", [p + "h", p + "w_down"], p + "mlp_out")


CHAT_TEMPLATE = ("{% for m in messages %}{{ '<' + m['role'] + '> ' + m['content'] + ' ' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<assistant> ' }}{% endif %}")


def save_tokenizer(folder, vocab=512) -> None:
    """A word-level tokenizer for the zoo decoders, written as ``tokenizer.json`` + ``tokenizer_config.json`` (with
    a chat template) into ``folder``: ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2 (EOS), role markers, then words ``w5`` ...
    (the Hugging Face ``tokenizers`` library; nothing is downloaded)."""
    import json
    from pathlib import Path

    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<unk>", "<s>", "</s>", "<user>", "<assistant>"]
    words = {t: i for i, t in enumerate(specials)}
    words.update({f"w{i}": i for i in range(len(specials), vocab)})
    tokenizer = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(specials[1:3])
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "chat_template": CHAT_TEMPLATE}))
