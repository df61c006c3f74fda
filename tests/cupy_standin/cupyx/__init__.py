"""``cupyx`` of the CuPy stand-in: only ``cupyx.scipy.special.erf``, which minitp's exact GeLU uses."""
