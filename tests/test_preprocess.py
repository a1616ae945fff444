"""On-device CLIP normalisation: bit for bit the host's (torch's ToTensor + Normalize)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genclip_jax.clip import preprocess

model_input = jax.jit(preprocess.model_input)


def _bits(x) -> np.ndarray:
    """The float32 bit patterns (so 0.0 and -0.0, or a last-ulp difference, never compare equal)."""
    return np.asarray(x, np.float32).view(np.uint32)


def test_every_value_of_every_channel_is_the_host_normalisation():
    # Channel c holds every value 0..255 once, each channel in another order (a mixed-up channel
    # or value would show).
    values = np.arange(256, dtype=np.uint8)
    pixels = np.stack([values, values[::-1], np.roll(values, 101)], axis=-1).reshape(16, 16, 3)
    want = preprocess.normalize(pixels)
    np.testing.assert_array_equal(_bits(model_input(pixels[None])[0]), _bits(want))
    assert want.dtype == np.float32 and np.unique(want[..., 0]).size == 256


def test_a_random_batch_is_the_host_normalisation_of_each_image():
    images = np.random.default_rng(0).integers(0, 256, (3, 42, 42, 3), dtype=np.uint8)
    got = model_input(images)
    assert got.dtype == jnp.float32 and got.shape == images.shape
    want = np.stack([preprocess.normalize(image) for image in images])
    np.testing.assert_array_equal(_bits(got), _bits(want))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_floats_are_taken_as_normalised_and_pass_through(dtype):
    images = jnp.asarray(np.random.default_rng(1).normal(size=(2, 8, 8, 3)), dtype)
    got = model_input(images)
    assert got.dtype == dtype
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(images, np.float32))


def test_other_integer_images_are_refused():
    with pytest.raises(ValueError, match="images: expected uint8 pixels or CLIP-normalised "
                                         "floats, got int32"):
        model_input(np.zeros((1, 4, 4, 3), np.int32))
