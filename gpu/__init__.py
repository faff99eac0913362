"""The one-shot GPU check (train.py on a real card), FLOPs of a batch and the devices' peaks."""
