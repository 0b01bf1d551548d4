"""Watching a run: metrics (TensorBoard, metrics.jsonl, MFU) and the profiler."""
