"""The atlas prior: banks of training brains on a grid of positions, the 2D registration that
fits them to a patient's slice, and the :class:`~monai_mrngan.atlas.prior.BrainPrior` built on both."""
