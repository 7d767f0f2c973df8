"""The jobs :class:`~gdrq_lightning.GDRQCallback` runs during training, one module each, the way
Lightning keeps ``utilities/`` beside its callbacks: which switches a phase turns on and what
stays frozen (:mod:`.phases`), calibration of ``auto`` clip factors (:mod:`.calibration`),
BatchNorm re-estimation (:mod:`.batchnorm`), the passes over training batches both use
(:mod:`.batches`) and the per-step guards (:mod:`.guards`). DDP reductions of activation
statistics live with the quantizers (:mod:`gdrq_lightning.quant.distributed`)."""
