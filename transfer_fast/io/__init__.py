"""Reading and writing files: checkpoints, streamed tensor ranges, data sets, atomic outputs."""
