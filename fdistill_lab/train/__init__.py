"""Lab of notebook 05: image-scale f-distill of EDM teachers on one or many GPUs (ImageNet-64, CIFAR-10).

``trainer`` (one class for one process or data-parallel ranks) with its settings in ``config``; ``presets``
(paper Table 5); ``cli`` (``python -m fdistill_lab.train``) with its run folder (``run_folder``), processes
(``dist``) and notebook launcher (``launch``); ``data`` and ``prepare_imagenet``; ``fid``; ``download``;
``teachers`` and ``edm_pickle`` (EDM's pickles, read without running their code); ``smoke_assets`` (tiny files).
"""
