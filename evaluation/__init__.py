"""The evaluation report, caption metrics, the captioning benchmarks and the COCO caption toolkit bridge."""
