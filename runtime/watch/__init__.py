"""The camera loop (``pcedge watch``): frames from a source through a detector, in overlapping stages.

    sources.py   cameras, video files, network streams, GStreamer pipelines, folders; reconnect and pacing
    channel.py   the bounded hand-off between two stages
    pipeline.py  capture -> backbone -> scoring -> output threads; every frame accounted for
    outputs.py   the JSONL event log, saved anomalous frames, the annotated video, the window
    summary.py   per-stage latencies, their fixed-size sample, the run's summary
"""
