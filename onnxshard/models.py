"""Models built in code, for the demo and benchmarks (and the test zoo). No downloads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

OPSET = 17


def weight(rng, name, *shape, scale=0.2):
    return nh.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def make_model(nodes, inputs, outputs, inits=(), functions=(), opsets=()):
    graph = h.make_graph(nodes, "onnxshard_model", inputs, outputs, list(inits))
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", OPSET), *opsets], functions=list(functions))
    model.ir_version = 10
    return model


def save(model: onnx.ModelProto, folder: Path, name: str = "model.onnx", external: bool = False) -> Path:
    """Write ``model`` to ``folder/name``; with ``external``, tensors over 128 bytes go to ``name.data``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    if external:
        onnx.save(model, str(path), save_as_external_data=True, location=name + ".data", size_threshold=128)
    else:
        onnx.save(model, str(path))
    return path


def transformer(layers=2, d=32, heads=4, ffn=64, seed=0, vocab=None, gelu_contrib=False):
    """Pre-LN transformer blocks with an additive attention mask; ``vocab`` adds an embedding Gather."""
    rng = np.random.default_rng(seed)
    hd = d // heads
    nodes, inits = [], []
    if vocab:
        inits.append(weight(rng, "embed", vocab, d))
        nodes.append(h.make_node("Gather", ["embed", "ids"], ["x"]))
        inputs = [h.make_tensor_value_info("ids", T.INT64, ["batch", "seq"])]
    else:
        inputs = [h.make_tensor_value_info("x", T.FLOAT, ["batch", "seq", d])]
    inputs.append(h.make_tensor_value_info("mask", T.FLOAT, ["batch", "seq"]))
    inits += [nh.from_array(np.array([0, 0, heads, hd], np.int64), "split_heads"),
              nh.from_array(np.array([0, 0, d], np.int64), "merge_heads"),
              nh.from_array(np.array([1, 2], np.int64), "mask_axes"),
              nh.from_array(np.array(-1e4, np.float32), "neg"),
              nh.from_array(np.array(1.0 / np.sqrt(hd), np.float32), "scale")]
    nodes += [h.make_node("Unsqueeze", ["mask", "mask_axes"], ["mask4"]),
              h.make_node("Sub", ["mask4", "one"], ["inv"]),
              h.make_node("Mul", ["inv", "neg"], ["bias"])]
    inits.append(nh.from_array(np.array(1.0, np.float32), "one"))
    x = "x"
    for i in range(layers):
        p = f"l{i}."
        inits += [nh.from_array(np.ones(d, np.float32), p + "ln1_g"), nh.from_array(np.zeros(d, np.float32), p + "ln1_b"),
                  nh.from_array(np.ones(d, np.float32), p + "ln2_g"), nh.from_array(np.zeros(d, np.float32), p + "ln2_b")]
        for w in ("q", "k", "v", "o"):
            inits += [weight(rng, p + w, d, d), weight(rng, p + w + "_b", d)]
        inits += [weight(rng, p + "fc1", d, ffn), weight(rng, p + "fc1_b", ffn), weight(rng, p + "fc2", ffn, d),
                  weight(rng, p + "fc2_b", d)]
        nodes.append(h.make_node("LayerNormalization", [x, p + "ln1_g", p + "ln1_b"], [p + "n1"], axis=-1))
        for w in ("q", "k", "v"):
            nodes += [h.make_node("MatMul", [p + "n1", p + w], [p + w + "m"]),
                      h.make_node("Add", [p + w + "m", p + w + "_b"], [p + w + "a"]),
                      h.make_node("Reshape", [p + w + "a", "split_heads"], [p + w + "r"])]
        nodes += _attention(p, "bias")
        nodes += [h.make_node("MatMul", [p + "cm", p + "o"], [p + "om"]),
                  h.make_node("Add", [p + "om", p + "o_b"], [p + "oa"]),
                  h.make_node("Add", [x, p + "oa"], [p + "res1"]),
                  h.make_node("LayerNormalization", [p + "res1", p + "ln2_g", p + "ln2_b"], [p + "n2"], axis=-1),
                  h.make_node("MatMul", [p + "n2", p + "fc1"], [p + "f1"]),
                  h.make_node("Add", [p + "f1", p + "fc1_b"], [p + "f1b"])]
        if gelu_contrib:
            nodes.append(h.make_node("Gelu", [p + "f1b"], [p + "g"], domain="com.microsoft"))
        else:
            nodes.append(h.make_node("Relu", [p + "f1b"], [p + "g"]))
        nodes += [h.make_node("MatMul", [p + "g", p + "fc2"], [p + "f2"]),
                  h.make_node("Add", [p + "f2", p + "fc2_b"], [p + "f2b"]),
                  h.make_node("Add", [p + "res1", p + "f2b"], [p + "out"])]
        x = p + "out"
    nodes.append(h.make_node("Identity", [x], ["y"]))
    opsets = [h.make_opsetid("com.microsoft", 1)] if gelu_contrib else []
    return make_model(nodes, inputs, [h.make_tensor_value_info("y", T.FLOAT, ["batch", "seq", d])], inits, opsets=opsets)


def bert_mlm(layers=2, d=64, heads=4, ffn=256, vocab=5003, tied=True, seed=0):
    """A BERT-style encoder with its masked-LM head: word embeddings, the transformer blocks of ``transformer``,
    then the head's transform (dense, erf-GELU, LayerNorm) and the decoder over the vocabulary with its bias. With
    ``tied`` the decoder is the word embedding transposed (as BERT exports it), else a weight of its own. Inputs
    ``ids[batch, seq]`` and ``mask[batch, seq]``; output ``logits[batch, seq, vocab]``. The default vocabulary is
    odd, like BERT's 30,522 and GPT-2's 50,257 over most degrees."""
    model = transformer(layers, d, heads, ffn, seed, vocab=vocab)
    rng = np.random.default_rng(seed + 1)
    g = model.graph
    inits = [weight(rng, "mlm.dense", d, d, scale=0.1), weight(rng, "mlm.dense_b", d, scale=0.1),
             nh.from_array(np.ones(d, np.float32), "mlm.ln_g"), nh.from_array(np.zeros(d, np.float32), "mlm.ln_b"),
             weight(rng, "mlm.bias", vocab, scale=0.1), nh.from_array(np.array(np.sqrt(2.0), np.float32), "mlm.sqrt2"),
             nh.from_array(np.array(0.5, np.float32), "mlm.half")]
    nodes = [h.make_node("MatMul", ["y", "mlm.dense"], ["mlm.dm"]),
             h.make_node("Add", ["mlm.dm", "mlm.dense_b"], ["mlm.da"]),
             h.make_node("Div", ["mlm.da", "mlm.sqrt2"], ["mlm.g0"]),
             h.make_node("Erf", ["mlm.g0"], ["mlm.g1"]),
             h.make_node("Add", ["mlm.g1", "one"], ["mlm.g2"]),
             h.make_node("Mul", ["mlm.da", "mlm.g2"], ["mlm.g3"]),
             h.make_node("Mul", ["mlm.g3", "mlm.half"], ["mlm.g"]),
             h.make_node("LayerNormalization", ["mlm.g", "mlm.ln_g", "mlm.ln_b"], ["mlm.n"], axis=-1)]
    if tied:
        nodes.append(h.make_node("Transpose", ["embed"], ["mlm.decoder"], perm=[1, 0]))
    else:
        inits.append(weight(rng, "mlm.decoder", d, vocab, scale=0.2))
    nodes += [h.make_node("MatMul", ["mlm.n", "mlm.decoder"], ["mlm.scores"]),
              h.make_node("Add", ["mlm.scores", "mlm.bias"], ["logits"])]
    g.node.extend(nodes)
    g.initializer.extend(inits)
    del g.output[:]
    g.output.append(h.make_tensor_value_info("logits", T.FLOAT, ["batch", "seq", vocab]))
    return model


def _attention(p: str, mask: str) -> list[onnx.NodeProto]:
    """Scaled dot-product attention over per-head ``{p}qr/kr/vr`` [batch, seq, heads, hd] with an additive
    ``mask``, merged back to ``{p}cm`` [batch, seq, d] (initializers ``scale`` and ``merge_heads``)."""
    return [h.make_node("Transpose", [p + "qr"], [p + "qt"], perm=[0, 2, 1, 3]),
            h.make_node("Transpose", [p + "kr"], [p + "kt"], perm=[0, 2, 3, 1]),
            h.make_node("Transpose", [p + "vr"], [p + "vt"], perm=[0, 2, 1, 3]),
            h.make_node("MatMul", [p + "qt", p + "kt"], [p + "s"]),
            h.make_node("Mul", [p + "s", "scale"], [p + "ss"]),
            h.make_node("Add", [p + "ss", mask], [p + "sm"]),
            h.make_node("Softmax", [p + "sm"], [p + "pr"], axis=-1),
            h.make_node("MatMul", [p + "pr", p + "vt"], [p + "ctx"]),
            h.make_node("Transpose", [p + "ctx"], [p + "ct"], perm=[0, 2, 1, 3]),
            h.make_node("Reshape", [p + "ct", "merge_heads"], [p + "cm"])]


def lstm(layers=4, inputs=64, hidden=256, seed=0):
    """A stacked LSTM over ``x[seq, batch, inputs]`` (ONNX's time-major layout): the batch is axis 1."""
    rng = np.random.default_rng(seed)
    nodes, inits, x, width = [], [], "x", inputs
    inits.append(nh.from_array(np.array([1], np.int64), "axis1"))
    for i in range(layers):
        inits += [weight(rng, f"W{i}", 1, 4 * hidden, width, scale=0.1),
                  weight(rng, f"R{i}", 1, 4 * hidden, hidden, scale=0.1), weight(rng, f"B{i}", 1, 8 * hidden, scale=0.1)]
        nodes += [h.make_node("LSTM", [x, f"W{i}", f"R{i}", f"B{i}"], [f"y{i}"], hidden_size=hidden),
                  h.make_node("Squeeze", [f"y{i}", "axis1"], [f"h{i}"])]
        x, width = f"h{i}", hidden
    nodes[-1].output[0] = "y"
    return make_model(nodes, [h.make_tensor_value_info("x", T.FLOAT, ["seq", "batch", inputs])],
                      [h.make_tensor_value_info("y", T.FLOAT, ["seq", "batch", hidden])], inits)


def bilstm(inputs=64, hidden=256, outputs=32, seed=0):
    """A tagger shaped like the issue's real BiLSTM: an input projection, one bidirectional LSTM that is most of the
    work, and a projection of both directions to ``outputs`` per step. ``x[seq, batch, inputs]`` -> ``y[seq,
    batch, outputs]``; the batch is axis 1."""
    rng = np.random.default_rng(seed)
    inits = [weight(rng, "Win", inputs, hidden, scale=0.1),
             weight(rng, "W", 2, 4 * hidden, hidden, scale=0.1), weight(rng, "R", 2, 4 * hidden, hidden, scale=0.1),
             weight(rng, "B", 2, 8 * hidden, scale=0.1), weight(rng, "Wout", 2 * hidden, outputs, scale=0.1),
             nh.from_array(np.array([0, 0, 2 * hidden], np.int64), "both")]
    nodes = [h.make_node("MatMul", ["x", "Win"], ["p"]), h.make_node("Tanh", ["p"], ["a"]),
             h.make_node("LSTM", ["a", "W", "R", "B"], ["h"], hidden_size=hidden, direction="bidirectional"),
             h.make_node("Transpose", ["h"], ["t"], perm=[0, 2, 1, 3]),  # [seq, dirs, batch, hidden] -> dirs last
             h.make_node("Reshape", ["t", "both"], ["f"]), h.make_node("MatMul", ["f", "Wout"], ["y"])]
    return make_model(nodes, [h.make_tensor_value_info("x", T.FLOAT, ["seq", "batch", inputs])],
                      [h.make_tensor_value_info("y", T.FLOAT, ["seq", "batch", outputs])], inits)


def gpt2(layers=2, d=64, heads=4, vocab=4096, max_seq=64, seed=0):
    """A GPT-2-style decoder: token + position embeddings, fused QKV projection split three ways, causal
    attention, erf-GELU MLP, final LayerNorm and an (untied) LM head. Input ``ids[batch, seq]`` (seq <= max_seq)."""
    rng = np.random.default_rng(seed)
    hd, ffn = d // heads, 4 * d
    causal = np.triu(np.full((max_seq, max_seq), -1e4, np.float32), 1)[None, None]
    inits = [weight(rng, "wte", vocab, d, scale=0.05), weight(rng, "wpe", max_seq, d, scale=0.05),
             nh.from_array(causal, "causal"), weight(rng, "lm_head", d, vocab, scale=0.05),
             nh.from_array(np.ones(d, np.float32), "lnf_g"), nh.from_array(np.zeros(d, np.float32), "lnf_b")]
    consts = {"split_heads": np.array([0, 0, heads, hd], np.int64), "merge_heads": np.array([0, 0, d], np.int64),
              "qkv_sizes": np.array([d, d, d], np.int64), "zero1": np.array([0], np.int64),
              "one1": np.array([1], np.int64), "two1": np.array([2], np.int64), "axes23": np.array([2, 3], np.int64),
              "scale": np.array(1.0 / np.sqrt(hd), np.float32), "half": np.array(0.5, np.float32),
              "one": np.array(1.0, np.float32), "sqrt2": np.array(np.sqrt(2.0), np.float32)}
    inits += [nh.from_array(v, k) for k, v in consts.items()]
    nodes = [h.make_node("Gather", ["wte", "ids"], ["tok"]),
             h.make_node("Shape", ["ids"], ["ids_shape"]),
             h.make_node("Slice", ["ids_shape", "one1", "two1"], ["seq_len"]),
             h.make_node("Slice", ["wpe", "zero1", "seq_len"], ["pos"]),
             h.make_node("Add", ["tok", "pos"], ["x"]),
             h.make_node("Concat", ["seq_len", "seq_len"], ["mask_end"], axis=0),
             h.make_node("Concat", ["zero1", "zero1"], ["mask_start"], axis=0),
             h.make_node("Slice", ["causal", "mask_start", "mask_end", "axes23"], ["mask"])]
    x = "x"
    for i in range(layers):
        p = f"h{i}."
        inits += [nh.from_array(np.ones(d, np.float32), p + "ln1_g"), nh.from_array(np.zeros(d, np.float32), p + "ln1_b"),
                  nh.from_array(np.ones(d, np.float32), p + "ln2_g"), nh.from_array(np.zeros(d, np.float32), p + "ln2_b"),
                  weight(rng, p + "c_attn", d, 3 * d, scale=0.1), weight(rng, p + "c_attn_b", 3 * d, scale=0.1),
                  weight(rng, p + "c_proj", d, d, scale=0.1), weight(rng, p + "c_proj_b", d, scale=0.1),
                  weight(rng, p + "c_fc", d, ffn, scale=0.1), weight(rng, p + "c_fc_b", ffn, scale=0.1),
                  weight(rng, p + "mlp_proj", ffn, d, scale=0.1), weight(rng, p + "mlp_proj_b", d, scale=0.1)]
        nodes += [h.make_node("LayerNormalization", [x, p + "ln1_g", p + "ln1_b"], [p + "n1"], axis=-1),
                  h.make_node("MatMul", [p + "n1", p + "c_attn"], [p + "qkv_m"]),
                  h.make_node("Add", [p + "qkv_m", p + "c_attn_b"], [p + "qkv"]),
                  h.make_node("Split", [p + "qkv", "qkv_sizes"], [p + "q", p + "k", p + "v"], axis=2)]
        for w in "qkv":
            nodes.append(h.make_node("Reshape", [p + w, "split_heads"], [p + w + "r"]))
        nodes += _attention(p, "mask")
        nodes += [h.make_node("MatMul", [p + "cm", p + "c_proj"], [p + "om"]),
                  h.make_node("Add", [p + "om", p + "c_proj_b"], [p + "oa"]),
                  h.make_node("Add", [x, p + "oa"], [p + "res1"]),
                  h.make_node("LayerNormalization", [p + "res1", p + "ln2_g", p + "ln2_b"], [p + "n2"], axis=-1),
                  h.make_node("MatMul", [p + "n2", p + "c_fc"], [p + "f1"]),
                  h.make_node("Add", [p + "f1", p + "c_fc_b"], [p + "f1b"]),
                  h.make_node("Div", [p + "f1b", "sqrt2"], [p + "g0"]),
                  h.make_node("Erf", [p + "g0"], [p + "g1"]),
                  h.make_node("Add", [p + "g1", "one"], [p + "g2"]),
                  h.make_node("Mul", [p + "f1b", p + "g2"], [p + "g3"]),
                  h.make_node("Mul", [p + "g3", "half"], [p + "g"]),
                  h.make_node("MatMul", [p + "g", p + "mlp_proj"], [p + "f2"]),
                  h.make_node("Add", [p + "f2", p + "mlp_proj_b"], [p + "f2b"]),
                  h.make_node("Add", [p + "res1", p + "f2b"], [p + "out"])]
        x = p + "out"
    nodes += [h.make_node("LayerNormalization", [x, "lnf_g", "lnf_b"], ["final"], axis=-1),
              h.make_node("MatMul", ["final", "lm_head"], ["logits"])]
    return make_model(nodes, [h.make_tensor_value_info("ids", T.INT64, ["batch", "seq"])],
                      [h.make_tensor_value_info("logits", T.FLOAT, ["batch", "seq", vocab])], inits)


def llama(layers=2, d=64, heads=8, kv_heads=2, ffn=128, seed=0):
    """A LLaMA-style decoder block stack over ``x[batch, seq, d]`` with an additive ``mask[batch, seq]``: RMSNorm,
    grouped-query attention (``kv_heads`` K/V heads, each shared by heads / kv_heads query heads, repeated with
    Unsqueeze + Expand + Reshape) and a SwiGLU MLP, no biases."""
    rng = np.random.default_rng(seed)
    hd, rep = d // heads, heads // kv_heads
    consts = {"q_heads": np.array([0, 0, heads, hd], np.int64), "kv_heads": np.array([0, 0, kv_heads, hd], np.int64),
              "merge_heads": np.array([0, 0, d], np.int64), "repeat": np.array([1, 1, rep, 1, 1], np.int64),
              "all_heads": np.array([0, heads, -1, hd], np.int64), "axis2": np.array([2], np.int64),
              "mask_axes": np.array([1, 2], np.int64), "neg": np.array(-1e4, np.float32),
              "one": np.array(1.0, np.float32), "eps": np.array(1e-6, np.float32),
              "two": np.array(2.0, np.float32), "scale": np.array(1.0 / np.sqrt(hd), np.float32)}
    inits = [nh.from_array(v, k) for k, v in consts.items()]
    nodes = [h.make_node("Unsqueeze", ["mask", "mask_axes"], ["mask4"]),
             h.make_node("Sub", ["mask4", "one"], ["inv"]),
             h.make_node("Mul", ["inv", "neg"], ["bias"])]

    def rms(x, g, out):
        inits.append(nh.from_array(np.ones(d, np.float32), g))
        return [h.make_node("Pow", [x, "two"], [out + ".sq"]),
                h.make_node("ReduceMean", [out + ".sq"], [out + ".ms"], axes=[-1]),
                h.make_node("Add", [out + ".ms", "eps"], [out + ".mse"]),
                h.make_node("Sqrt", [out + ".mse"], [out + ".rms"]),
                h.make_node("Div", [x, out + ".rms"], [out + ".n"]),
                h.make_node("Mul", [out + ".n", g], [out])]

    x = "x"
    for i in range(layers):
        p = f"l{i}."
        inits += [weight(rng, p + "wq", d, d, scale=0.1), weight(rng, p + "wk", d, kv_heads * hd, scale=0.1),
                  weight(rng, p + "wv", d, kv_heads * hd, scale=0.1), weight(rng, p + "wo", d, d, scale=0.1),
                  weight(rng, p + "w_gate", d, ffn, scale=0.1), weight(rng, p + "w_up", d, ffn, scale=0.1),
                  weight(rng, p + "w_down", ffn, d, scale=0.1)]
        nodes += rms(x, p + "attn_norm", p + "n1")
        nodes += [h.make_node("MatMul", [p + "n1", p + "wq"], [p + "q"]),
                  h.make_node("MatMul", [p + "n1", p + "wk"], [p + "k"]),
                  h.make_node("MatMul", [p + "n1", p + "wv"], [p + "v"]),
                  h.make_node("Reshape", [p + "q", "q_heads"], [p + "qr"]),
                  h.make_node("Reshape", [p + "k", "kv_heads"], [p + "kr"]),
                  h.make_node("Reshape", [p + "v", "kv_heads"], [p + "vr"]),
                  h.make_node("Transpose", [p + "qr"], [p + "qt"], perm=[0, 2, 1, 3])]
        for w in "kv":  # [B, KVH, S, hd] -> [B, KVH, rep, S, hd] -> [B, H, S, hd]
            nodes += [h.make_node("Transpose", [p + w + "r"], [p + w + "t"], perm=[0, 2, 1, 3]),
                      h.make_node("Unsqueeze", [p + w + "t", "axis2"], [p + w + "u"]),
                      h.make_node("Expand", [p + w + "u", "repeat"], [p + w + "e"]),
                      h.make_node("Reshape", [p + w + "e", "all_heads"], [p + w + "h"])]
        nodes += [h.make_node("Transpose", [p + "kh"], [p + "khT"], perm=[0, 1, 3, 2]),
                  h.make_node("MatMul", [p + "qt", p + "khT"], [p + "s"]),
                  h.make_node("Mul", [p + "s", "scale"], [p + "ss"]),
                  h.make_node("Add", [p + "ss", "bias"], [p + "sm"]),
                  h.make_node("Softmax", [p + "sm"], [p + "pr"], axis=-1),
                  h.make_node("MatMul", [p + "pr", p + "vh"], [p + "ctx"]),
                  h.make_node("Transpose", [p + "ctx"], [p + "ct"], perm=[0, 2, 1, 3]),
                  h.make_node("Reshape", [p + "ct", "merge_heads"], [p + "cm"]),
                  h.make_node("MatMul", [p + "cm", p + "wo"], [p + "o"]),
                  h.make_node("Add", [x, p + "o"], [p + "res1"])]
        nodes += rms(p + "res1", p + "mlp_norm", p + "n2")
        nodes += [h.make_node("MatMul", [p + "n2", p + "w_gate"], [p + "gate"]),
                  h.make_node("Sigmoid", [p + "gate"], [p + "sig"]),
                  h.make_node("Mul", [p + "gate", p + "sig"], [p + "silu"]),
                  h.make_node("MatMul", [p + "n2", p + "w_up"], [p + "up"]),
                  h.make_node("Mul", [p + "silu", p + "up"], [p + "hidden"]),
                  h.make_node("MatMul", [p + "hidden", p + "w_down"], [p + "down"]),
                  h.make_node("Add", [p + "res1", p + "down"], [p + "out"])]
        x = p + "out"
    nodes.append(h.make_node("Identity", [x], ["y"]))
    inputs = [h.make_tensor_value_info("x", T.FLOAT, ["batch", "seq", d]),
              h.make_tensor_value_info("mask", T.FLOAT, ["batch", "seq"])]
    return make_model(nodes, inputs, [h.make_tensor_value_info("y", T.FLOAT, ["batch", "seq", d])], inits)
