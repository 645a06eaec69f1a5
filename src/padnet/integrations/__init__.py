"""PAD-Net in other people's training loops (docs/integrations.md).

* :mod:`padnet.integrations.core`: :class:`~padnet.integrations.core.PadSchedule`, the
  trainer-independent schedule (router temperature, interleaved IMP, auxiliary loss, logged
  ratio) that every integration below and a plain PyTorch loop share.
* :mod:`padnet.integrations.hf`: a ``transformers`` ``TrainerCallback``, a ``Trainer`` that adds
  the auxiliary loss, and the ``save_pretrained`` / ``from_pretrained`` round trip of converted
  Hugging Face models (:mod:`padnet.integrations.hf_io`).
* :mod:`padnet.integrations.lightning`: a Lightning ``Callback`` (the ``lightning`` extra).

``import padnet`` imports none of these; each imports its framework only when it is imported.
"""

__all__: list[str] = []
