"""Export a torchvision classifier with random weights (torch.manual_seed(0)) to ONNX:
dynamic batch, opset 17, the TorchScript exporter (dynamo=False).

Run with a python that has torch + torchvision (on the device: plain `python3`):

    python3 bench/export_torchvision.py /tmp/bench/resnet50.onnx [--arch resnet50]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--opset", type=int, default=17)
    ap.add_argument("--size", type=int, default=224)
    args = ap.parse_args(argv)

    import torch
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, args.arch)(weights=None).eval()
    x = torch.randn(1, 3, args.size, args.size)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    kwargs = dict(input_names=["input"], output_names=["logits"], opset_version=args.opset, do_constant_folding=True,
                  dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    t0 = time.perf_counter()
    with torch.no_grad():
        try:
            torch.onnx.export(model, (x,), str(args.out), dynamo=False, **kwargs)
        except TypeError:  # a torch without the dynamo argument (< 2.5)
            torch.onnx.export(model, (x,), str(args.out), **kwargs)
    info = {"arch": args.arch, "onnx": str(args.out), "bytes": args.out.stat().st_size, "opset": args.opset,
            "torch": torch.__version__, "torchvision": torchvision.__version__,
            "export_seconds": round(time.perf_counter() - t0, 2)}
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
