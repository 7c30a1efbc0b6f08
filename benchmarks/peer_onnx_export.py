"""Export anomalib's PatchCore with a 10 % memory bank to ONNX, the way anomalib exports it (peer side only).

Runs under the PEER interpreter (``/work/peer-venv/bin/python``: anomalib 2.7, timm, torch), started as a
subprocess by ``bench_vs_peer_latency.py``; it never imports pcedge. Steps:

1. anomalib's ``PatchcoreModel`` on ``tf_efficientnet_lite0`` with the Lite0 package's ImageNet weights
   (``peer_anomalib.build_peer``), in training mode over every training image (stretched to 224 x 224,
   torchvision resize with antialiasing, timm's normalisation): anomalib's own patch features ``[n, 152]``.
2. The memory bank: a seeded random ``ratio`` of those rows. anomalib's k-center greedy at 10 % of BSData
   takes about 30 min on this machine; the brute-force search inside the graph costs the same for any
   rows of the same count, so a random subset of the same size times the same work.
3. ``torch.onnx.export`` of the model in eval mode with anomalib 2.7's ``to_onnx`` settings (dynamo
   exporter, opset 14 requested -- torch 2.14 keeps opset 18 as its converter has no Pad adapter --, input ``input``
   ``[1, 3, 224, 224]``, outputs
   ``pred_score`` and ``anomaly_map``): the bank, the nearest-neighbour search (anomalib's
   ``euclidean_dist`` + ``min``), its Eq. 7 re-weighting and the anomaly map (upsampling + Gaussian blur)
   are all inside the graph.

Writes ``OUT.onnx`` (the bank as an initializer) and ``OUT.json`` (what was exported, how).

    /work/peer-venv/bin/python benchmarks/peer_onnx_export.py --weights W --train DIR --out results/bundles/x.onnx
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peer_anomalib import PeerPatchCore  # noqa: E402

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path, required=True, help="efficientnet-lite0 package state dict")
    parser.add_argument("--train", type=Path, required=True, help="folder of good training images")
    parser.add_argument("--out", type=Path, required=True, help="the .onnx file to write")
    parser.add_argument("--ratio", type=float, default=0.1, help="memory bank rows as a fraction of all patches")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import anomalib

    paths = sorted(p for p in args.train.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        print(f"{args.train}: no training images", file=sys.stderr)
        return 2
    peer = PeerPatchCore(args.weights, mode="stretch", size=args.size)
    model = peer.model
    started = time.perf_counter()
    model.train()
    with torch.no_grad():
        for start in range(0, len(paths), 16):
            model(peer._load(paths[start : start + 16])[0])
    features = torch.vstack(model.embedding_store)  # [n_images * h * w, 152]
    model.embedding_store.clear()
    n_bank = max(1, int(round(args.ratio * features.shape[0])))
    rows = np.sort(np.random.default_rng(args.seed).choice(features.shape[0], size=n_bank, replace=False))
    model.memory_bank = features[torch.from_numpy(rows)].contiguous()
    model.eval()
    fit_seconds = time.perf_counter() - started

    # anomalib 2.7 AnomalibModule.to_onnx: dynamo=True, opset 14, input "input", batch axis dynamic,
    # outputs named after the InferenceBatch fields that are not None.
    probe = torch.zeros(1, 3, args.size, args.size)
    with torch.no_grad():
        output_names = [name for name, value in model(probe)._asdict().items() if value is not None]
    tmp = args.out.with_name(args.out.name + ".tmp")
    started = time.perf_counter()
    # Batch fixed at 1 (what is timed): anomalib's dynamic batch axis is specialised away by the dynamo
    # exporter for this model anyway (PatchcoreModel reshapes with the example's batch size).
    torch.onnx.export(model, (probe,), str(tmp), opset_version=14, input_names=["input"],
                      output_names=output_names, dynamo=True, external_data=False)
    os.replace(tmp, args.out)
    export_seconds = time.perf_counter() - started
    record = {
        "peer": f"anomalib {anomalib.__version__} PatchcoreModel, tf_efficientnet_lite0 (timm {__import__('timm').__version__}), "
                "layers blocks.2 + blocks.4, num_neighbors 9",
        "torch": torch.__version__,
        "export": "torch.onnx.export(model.eval(), dynamo=True, opset_version=14 requested, batch 1) as anomalib 2.7 to_onnx",
        "bank_rows": "seeded random subset of anomalib's own training patch features (not k-center greedy: same "
                     "count, same brute-force work)",
        "bank_shape": list(model.memory_bank.shape),
        "n_patches": int(features.shape[0]),
        "ratio": args.ratio,
        "seed": args.seed,
        "n_train_images": len(paths),
        "input": [1, 3, args.size, args.size],
        "outputs": output_names,
        "opset": int(__import__("onnx").load(str(args.out), load_external_data=False).opset_import[0].version),
        "preprocessing_outside_graph": "RGB, resize to size x size, /255, (x - 0.5) / 0.5 (timm's mean/std for this model)",
        "fit_seconds": round(fit_seconds, 1),
        "export_seconds": round(export_seconds, 1),
    }
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=2))
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
