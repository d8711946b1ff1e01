"""GenCLIP engine: a library that scores batches of frames; knows nothing of cameras or brokers."""
