"""Measuring a bundle: accuracy on labelled data, latency against the machine's limits.

    dataset.py   the MVTec AD folder layout (test/<type>, ground_truth/<type>/<stem>_mask.png)
    metrics.py   image/pixel AUROC, AUPRO, F1 (numpy only)
    accuracy.py  a detector over a category -> the metrics (``pcedge eval``)
    flops.py     FLOPs and bytes of an ONNX graph; this machine's measured peak
    machine.py   the machine a measurement ran on
    latency.py   per-stage latency and throughput beside each stage's floor (``pcedge bench``)
    targets.py   Jetson modules' published peak rates, each with its source
    jetson_estimate.py  an estimate on paper of the per-stage latency on a Jetson (``pcedge bench --target``)

Nothing on the detector path imports this package.
"""
