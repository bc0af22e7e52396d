"""PyTorch twins of admmprune's LeNet-5 and ResNet-20, timed on request.

Not part of admmprune: ``bench_vs_torch.py`` starts this file under a Python
that has PyTorch (a separate virtual environment, never admmprune's) and
talks to it in JSON lines on stdin/stdout, so that both frameworks stay warm
and take turns on the same machine:

    {"op": "train", "model": ..., "widths": [...], "batch": 128, "n": 10}
    {"op": "eval", "model": ..., "widths": [...], "batch": 256, "n": 10}
    {"op": "epoch", "model": ..., "widths": [...], "batch": 128, "data": "train.npz"}
    {"op": "conv", "shape": [B, H, W, C], "out": ..., "kernel": 3, "n": 10}
    {"op": "conv_grad", "shape": [B, H, W, C], "out": ..., "kernel": 3, "wrt": "weight", "n": 10}

``train``/``eval`` answer ``{"times": [seconds, ...]}`` for ``n`` steps on
random data (the first call of a case builds it and warms it up, untimed);
``conv`` times one bias-free "same"-padded convolution alone (inference mode);
``conv_grad`` times its gradient alone, with respect to the ``weight`` (the
kernel gradient of a training step) or the ``input`` (the gradient a step
passes down), from a fixed output gradient, as autograd's backward runs it;
``epoch`` answers ``{"seconds": ..., "steps": ...}`` for one shuffled epoch
over the uint8 images of an ``.npz`` (``images`` NHWC, ``labels``), normalised
and batched on the fly as a ``DataLoader`` over in-memory tensors would.

The models follow admmprune's zoo: LeNet-5 is Caffe's (no nonlinearity after
the convs, 5x5 VALID convs, 2x2 max-pools, fc1 + relu, fc2); ResNet-20 has a
3x3 stem conv + BN, three stages of three basic blocks, option-B shortcuts (a
1x1 conv + BN) where the shape changes, global average pooling and a dense
head; ``widths`` lists every conv's output channels in admmprune's order.
"""

import json
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 (PyTorch's own spelling)
from torch import nn


class LeNet5(nn.Module):
    def __init__(self, widths, in_channels=1, size=28, classes=10):
        super().__init__()
        f1, f2, f3 = widths
        side = ((size - 4) // 2 - 4) // 2
        self.conv1, self.conv2 = nn.Conv2d(in_channels, f1, 5), nn.Conv2d(f1, f2, 5)
        self.fc1, self.fc2 = nn.Linear(side * side * f2, f3), nn.Linear(f3, classes)

    def forward(self, x):
        x = F.max_pool2d(self.conv2(F.max_pool2d(self.conv1(x), 2)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def conv_bn(cin, cout, k, stride=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout))


class Block(nn.Module):
    def __init__(self, cin, w1, w2, stride, shortcut):
        super().__init__()
        self.branch = nn.Sequential(conv_bn(cin, w1, 3, stride), nn.ReLU(), conv_bn(w1, w2, 3))
        self.shortcut = conv_bn(cin, shortcut, 1, stride) if shortcut else nn.Identity()

    def forward(self, x):
        return F.relu(self.branch(x) + self.shortcut(x))


class ResNet20(nn.Module):
    def __init__(self, widths, in_channels=1, classes=10):
        super().__init__()
        it = iter(widths)
        c = next(it)
        self.stem = nn.Sequential(conv_bn(in_channels, c, 3), nn.ReLU())
        blocks = []
        for stage in range(3):
            for j in range(3):
                projection = stage > 0 and j == 0
                w1, w2 = next(it), next(it)
                blocks.append(Block(c, w1, w2, 2 if projection else 1, next(it) if projection else 0))
                c = w2
        self.blocks, self.head = nn.Sequential(*blocks), nn.Linear(c, classes)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


MODELS = {"lenet5": LeNet5, "resnet20": ResNet20}


class Case:
    def __init__(self, model, widths, batch, train):
        torch.manual_seed(0)
        self.model = MODELS[model](widths)
        self.model.train(train)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.x = torch.randn(batch, 1, 28, 28)
        self.y = torch.arange(batch) % 10
        self.train = train
        self.run(3)

    def step(self, x, y):
        if not self.train:
            with torch.inference_mode():
                return self.model(x)
        self.opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.model(x), y)
        loss.backward()
        self.opt.step()
        return loss

    def run(self, n):
        times = []
        for _ in range(n):
            start = time.perf_counter()
            self.step(self.x, self.y)
            times.append(time.perf_counter() - start)
        return times

    def epoch(self, path, batch):
        data = np.load(path)
        images = torch.from_numpy(data["images"])  # uint8 NHWC, in memory, as a DataLoader's dataset would be
        labels = torch.from_numpy(data["labels"].astype(np.int64))
        mean, std = float(data["mean"]), float(data["std"])
        start = time.perf_counter()
        order = torch.randperm(len(labels))
        steps = len(labels) // batch
        for s in range(steps):
            idx = order[s * batch : (s + 1) * batch]
            x = (images[idx].permute(0, 3, 1, 2).float() / 255.0 - mean) / std
            self.step(x, labels[idx])
        return time.perf_counter() - start, steps


class Conv:
    def __init__(self, shape, out, kernel):
        b, h, w, c = shape
        torch.manual_seed(0)
        self.x = torch.randn(b, c, h, w)
        self.w = torch.randn(out, c, kernel, kernel)
        self.pad = kernel // 2
        self.run(3)

    def run(self, n):
        times = []
        with torch.inference_mode():
            for _ in range(n):
                start = time.perf_counter()
                F.conv2d(self.x, self.w, padding=self.pad)
                times.append(time.perf_counter() - start)
        return times


class ConvGrad(Conv):
    def __init__(self, shape, out, kernel, wrt):
        b, h, w, _ = shape
        self.g = torch.randn(b, out, h, w, generator=torch.Generator().manual_seed(2))
        self.wrt = wrt
        super().__init__(shape, out, kernel)

    def run(self, n):
        times = []
        with torch.no_grad():
            for _ in range(n):
                start = time.perf_counter()
                if self.wrt == "weight":
                    torch.nn.grad.conv2d_weight(self.x, self.w.shape, self.g, padding=self.pad)
                else:
                    torch.nn.grad.conv2d_input(self.x.shape, self.w, self.g, padding=self.pad)
                times.append(time.perf_counter() - start)
        return times


def main():
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else torch.get_num_threads())
    cases = {}
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads()}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "conv":
            key = ("conv", tuple(req["shape"]), req["out"], req["kernel"])
            if key not in cases:
                cases[key] = Conv(req["shape"], req["out"], req["kernel"])
            print(json.dumps({"times": cases[key].run(req["n"])}), flush=True)
            continue
        if req["op"] == "conv_grad":
            key = ("conv_grad", tuple(req["shape"]), req["out"], req["kernel"], req["wrt"])
            if key not in cases:
                cases[key] = ConvGrad(req["shape"], req["out"], req["kernel"], req["wrt"])
            print(json.dumps({"times": cases[key].run(req["n"])}), flush=True)
            continue
        key = (req["model"], tuple(req["widths"]), req["batch"], req["op"] != "eval")
        if key not in cases:
            cases[key] = Case(req["model"], req["widths"], req["batch"], req["op"] != "eval")
        case = cases[key]
        if req["op"] == "epoch":
            seconds, steps = case.epoch(req["data"], req["batch"])
            out = {"seconds": seconds, "steps": steps}
        else:
            out = {"times": case.run(req["n"])}
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
