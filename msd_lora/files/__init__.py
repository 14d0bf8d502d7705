"""Files on disk: the weight containers users bring (safetensors, torch zip pickles, MindSpore checkpoints), read
into numpy and written back, and atomic writes. Nothing here knows what the tensors mean."""
