"""Lab of notebook 05: image-scale f-distill of EDM teachers on one or many GPUs: the trainer and its settings,
presets, the command line and its run folder, data, FID, downloads and EDM teachers (see each module)."""
