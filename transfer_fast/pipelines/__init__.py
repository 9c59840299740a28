"""Multi-step workflows that own run folders: scan, gap run, experiment, demo."""
