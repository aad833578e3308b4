"""Bring your own models: FM-KT between two CNNs of your own, with your own DataLoader, on CPU in under a minute.

    python examples/custom_models.py [OUT]          # default OUT: runs/custom_models

1. a teacher and a student that fmkt has never seen (plain nn.Modules, defined below);
2. a torch DataLoader over sklearn's 8x8 digits (any DataLoader of (images, labels) does);
3. the teacher trained briefly with an ordinary PyTorch loop;
4. FM-KT through the Python API: the student's feature map and head are found on one batch, and the
   distillation loss goes into *your* training loop (``fm.loss``), here a dozen lines;
5. evaluation at K = 1, 2, 4, the standard artifact (OUT/artifact), and an ONNX export with K = 4 unrolled
   whose parity with PyTorch is checked (OUT/export-onnx-k4).
"""
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fmkt


class TeacherCNN(nn.Module):
    """A wider CNN; it only has to return logits."""

    def __init__(self, num_classes=10, in_channels=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 32, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 48, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(48)
        self.head = nn.Linear(48, num_classes)

    def forward(self, x):
        x = F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        return self.head(x.mean(dim=(2, 3)))


class StudentCNN(nn.Module):
    """A small CNN with a ``forward_features`` method: that is where fmkt takes the student's feature map.

    Without one, fmkt finds the map on a dry run (or take it from a named layer: ``feature_layer="body"``).
    Its logits must be global average pooling of that map followed by an nn.Linear, which FM-KT's shape map is.
    """

    def __init__(self, num_classes=10, in_channels=1):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        )
        self.fc = nn.Linear(32, num_classes)

    def forward_features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.fc(self.forward_features(x).mean(dim=(2, 3)))


def loaders(batch_size=64):
    """Your data: here sklearn's digits as float images in [0, 1] (fmkt.load_dataset is only a convenience)."""
    train, test, _ = fmkt.load_dataset("digits")
    gen = torch.Generator().manual_seed(0)
    return (DataLoader(TensorDataset(train.images, train.labels), batch_size, shuffle=True, generator=gen),
            DataLoader(TensorDataset(test.images, test.labels), 256))


def accuracy(model, loader):
    model.eval()
    with torch.no_grad():
        hits = sum(int((model(x).argmax(1) == y).sum()) for x, y in loader)
    return 100.0 * hits / len(loader.dataset)


def main(out="runs/custom_models"):
    out = Path(out)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    train_loader, test_loader = loaders()

    # 1. the teacher: ordinary PyTorch training
    teacher = TeacherCNN()
    opt = torch.optim.SGD(teacher.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 0.1, total_steps=8 * len(train_loader))
    for _ in range(8):
        teacher.train()
        for images, labels in train_loader:
            loss = F.cross_entropy(teacher(images), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    print(f"teacher: {accuracy(teacher, test_loader):.2f} % top-1")

    # 2. FM-KT around your two modules; channels and classes come from one batch
    # arch: the import path that rebuilds the student when the artifact is loaded (eval, export, bench)
    fm = fmkt.FMKT(StudentCNN(), teacher, example=next(iter(train_loader)), loss="dist", encoder="conv",
                   schedule="rectified", train_steps=4, arch="custom_models:StudentCNN")
    opt = torch.optim.SGD(fm.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    epochs = 8
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * len(train_loader))
    for epoch in range(epochs):  # your loop; fm.fit(train_loader, epochs=8) does the same
        fm.train()
        for images, labels in train_loader:
            loss = fm.loss(images, labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    acc = fm.evaluate(test_loader, steps=[1, 2, 4])
    print("student (FM-KT): " + ", ".join(f"K={k} {v:.2f} %" for k, v in acc.items()))

    # 3. the standard artifact, and its ONNX export with K = 4 (parity with PyTorch checked)
    artifact = fm.save(out / "artifact", dataset="digits")
    result = fmkt.export_artifact(artifact, steps=4, fmt="onnx", out=out / "export-onnx-k4", force=True)
    worst = max(row.max_abs_diff for row in result.reports[0].rows)
    print(f"artifact: {artifact}")
    print(f"onnx: {result.out / 'model.onnx'} (parity passed, max abs diff {worst:.2e})")
    print(f"done in {time.perf_counter() - t0:.1f} s; from the shell: PYTHONPATH=examples fmkt-cli eval {artifact}")
    return acc


if __name__ == "__main__":
    main(*sys.argv[1:2])
