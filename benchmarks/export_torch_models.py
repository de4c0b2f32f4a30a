"""Export a few real models with torch (not a dependency of onnxshard) to try the planner on real exports.

    pip install torch==2.13.0 onnxscript   # in any environment
    python benchmarks/export_torch_models.py OUT_DIR
    for m in OUT_DIR/*.onnx; do onnxshard verify $m --stages 3; done

Writes BERT-style and GPT-2-style encoders/decoders, a ResNet-style CNN and a stacked LSTM, each with both the
dynamo exporter and the TorchScript one, weights as external data.
"""

import sys
from pathlib import Path

import torch
from torch import nn


class Gpt2Block(nn.Module):
    def __init__(self, d=128, heads=4):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x, causal):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=causal, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class Gpt2(nn.Module):
    def __init__(self, vocab=500, d=128, layers=6):
        super().__init__()
        self.embed, self.pos = nn.Embedding(vocab, d), nn.Embedding(256, d)
        self.blocks = nn.ModuleList(Gpt2Block(d) for _ in range(layers))
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        seq = ids.shape[1]
        x = self.embed(ids) + self.pos(torch.arange(seq, device=ids.device))
        causal = torch.triu(torch.full((seq, seq), float("-inf")), diagonal=1)
        for block in self.blocks:
            x = block(x, causal)
        return self.head(x)


class Bert(nn.Module):
    def __init__(self, vocab=500, d=128, layers=6):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, 4, 4 * d, batch_first=True, dropout=0.0)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, ids, mask):
        return self.encoder(self.embed(ids), src_key_padding_mask=mask == 0)


class ResNetish(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                                  nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16))
                                    for _ in range(4))
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = torch.relu(x + block(x))
        return self.fc(x.mean(dim=(2, 3)))


class Lstm(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(32, 64, num_layers=3, batch_first=True)
        self.out = nn.Linear(64, 8)

    def forward(self, x):
        return self.out(self.lstm(x)[0])


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    ids = torch.randint(0, 500, (2, 16))
    cases = {
        "gpt2": (Gpt2(), (ids,), ["ids"], {"ids": {0: "batch", 1: "seq"}}),
        "bert": (Bert(), (ids, torch.ones(2, 16, dtype=torch.int64)), ["ids", "mask"],
                 {"ids": {0: "batch", 1: "seq"}, "mask": {0: "batch", 1: "seq"}}),
        "resnet": (ResNetish(), (torch.randn(2, 3, 16, 16),), ["img"], {"img": {0: "batch"}}),
        "lstm": (Lstm(), (torch.randn(2, 10, 32),), ["x"], {"x": {0: "batch", 1: "seq"}}),
    }
    for name, (module, args, names, dynamic) in cases.items():
        module.eval()
        for dynamo in (True, False):
            path = out / f"{name}_{'dynamo' if dynamo else 'ts'}" / "model.onnx"
            path.parent.mkdir(exist_ok=True)
            try:
                if dynamo:
                    shapes = tuple({axis: torch.export.Dim.DYNAMIC for axis in dynamic[n]} for n in names)
                    program = torch.onnx.export(module, args, dynamo=True, input_names=names, dynamic_shapes=shapes)
                    program.save(str(path), external_data=True)
                else:
                    torch.onnx.export(module, args, str(path), dynamo=False, input_names=names,
                                      dynamic_axes=dynamic, opset_version=17, external_data=True)
                print("exported", path)
            except Exception as e:  # report and go on: the point is to try what the exporters produce
                print("FAILED", path, type(e).__name__, str(e)[:200])


if __name__ == "__main__":
    main(Path(sys.argv[1]))
