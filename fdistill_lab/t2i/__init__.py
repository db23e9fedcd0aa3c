"""Text-to-image f-distill: a one-step student of Stable Diffusion 1.5 (paper Table 4, notebook 06).

Modules, one concept each (diffusers and transformers are imported where used: ``pip install -e .[t2i]``):

* :mod:`.schedule`: SD's discrete VP noise schedule in EDM's variables (x = x0 + sigma eps);
* :mod:`.denoiser`: the U-Net behind the EDM denoiser interface (``SDDenoiser``: x0, down/mid-block features) and
  the classifier-free-guided teacher (``GuidedDenoiser``);
* :mod:`.components`, :mod:`.loader`: the pipeline's parts and their offline loader (local folder or HF cache);
* :mod:`.tiny`: tiny randomly initialised components, synthetic captioned data and stand-ins for tests;
* :mod:`.config`: ``T2IConfig``, ``T2IRunConfig`` and the ``sd15`` preset (Table 5);
* :mod:`.trainer`: ``T2ITrainer``, the image trainer (``fdistill_lab.train``) on latents and text embeddings;
* :mod:`.data`: image-caption folders and webdataset shards, encoded to latents and text embeddings;
* :mod:`.run`, :mod:`.cli`: a run folder (checkpoints, resume, DDP) and ``python -m fdistill_lab.t2i``;
* :mod:`.evaluate`: zero-shot COCO FID, CLIP score, the teacher's sampler, latency.
"""
