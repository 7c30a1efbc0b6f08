"""Device side: bundle I/O, backends, index, scoring, detector, camera loop (never imports torch)."""
