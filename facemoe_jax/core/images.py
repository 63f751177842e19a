"""The pixel convention every model input shares."""


def normalize_images(images):
    """uint8 pixels -> float32 in [-1, 1] by (x / 255 - 0.5) / 0.5, the FaceMoE convention.

    Works on numpy and jax arrays of any shape (e.g. (B, H, W, 3)); returns the same kind.
    """
    return (images.astype("float32") / 255.0 - 0.5) / 0.5
