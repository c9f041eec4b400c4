"""Where an array lives, asked without importing numba.cuda (which may be missing)."""


def is_device_array(array):
    """Whether ``array`` lives on a GPU: a numba device array, or anything with the CUDA array interface."""
    return bool(getattr(array, "__cuda_ndarray__", False)) or hasattr(array, "__cuda_array_interface__")
